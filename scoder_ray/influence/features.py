"""Per-example LoRA gradient features, optimizer-aware, randomly projected (LESS-style).

For a LoRA checkpoint with parameters theta and the warm-up's Adam moments (m, v, betas b1, b2, eps):

- per-example gradient g_i of the example's mean response-token loss w.r.t. the LoRA parameters, for
  a whole padded batch from one backward pass (see `GradientFeatures.gradients`); g_i does not depend
  on its batch-mates or on padding;
- candidates (training data) use the Adam update direction, exactly as LESS computes it:
      m' = b1 * m + (1 - b1) * g,   v' = b2 * v + (1 - b2) * g**2,   u = m' / sqrt(v' + eps)
  (eps inside the square root, no bias correction: a per-checkpoint scalar that cosine ignores);
- references (teacher samples) use the plain gradient g;
- the flat vector (parameters in sorted-name order, P of them) is projected to d dimensions by a map
  derived from (run seed, checkpoint) alone, so every actor on every node builds the same one without
  shipping it (`Projector`):
  * P <= sketch_dim (small adapters): x R / sqrt(d), R a dense P x d Rademacher (+-1) matrix;
  * P > sketch_dim (LoRA r=128 on a 7B model: P = 134M): a CountSketch first (coordinate j is added,
    with a hashed sign, into one of m = sketch_dim hashed buckets: O(P) per example, no matrix), then
    the dense m x d Rademacher R. Both stages are Johnson-Lindenstrauss maps; the sketch adds about d/m
    to the projection's relative error variance (1/8 at the defaults), and R (m x d) is small enough to
    generate once per actor and keep, where a dense P x d R (134M x 8192) had to be regenerated on every
    pass and took 92% of the GPU kernel's time (issue 20; bench/influence.py --case smollm2-r128).
  Candidates' Adam directions are elementwise in the full gradient, so they are computed on the full
  per-example gradient first and then go through the same linear map as the references' plain gradients.
"""
from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class MissingMomentsError(FileNotFoundError):
    pass


def load_checkpoint(base_model: str, ckpt_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, LoRA params {adapter key: tensor}, moments {key: (m, v)}, optimizer meta)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    opt_dir = Path(ckpt_dir) / "optimizer"
    if not (opt_dir / "exp_avg.safetensors").is_file():
        raise MissingMomentsError(f"{ckpt_dir}: no Adam moments (optimizer/exp_avg.safetensors); influence needs a "
                                  "LoRA warm-up checkpoint written by the training stage")
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    model = PeftModel.from_pretrained(base, ckpt_dir).to(device).eval()
    params = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.", ".")
            params[key] = p.detach()
    m, v = load_file(opt_dir / "exp_avg.safetensors"), load_file(opt_dir / "exp_avg_sq.safetensors")
    if set(m) != set(params):
        raise ValueError(f"{ckpt_dir}: Adam moments do not match the adapter's parameters "
                         f"({len(set(m) ^ set(params))} names differ)")
    meta = json.loads((opt_dir / "optimizer.json").read_text())
    moments = {k: (m[k].to(device), v[k].to(device)) for k in params}
    return model, params, moments, meta


class GradientFeatures:
    """Computes projected per-example gradient features for one checkpoint."""

    def __init__(self, base_model: str, ckpt_dir: str, ckpt_name: str, dim: int, run_seed: int,
                 block_rows: int = 4096, device: str = "cpu", cache_mb: int = 1024, proj_dtype: str = "float32",
                 model_dtype: str = "float32", sketch_dim: int = 0):
        self.device = device
        self.model, self.params, self.moments, self.meta = load_checkpoint(base_model, ckpt_dir, device,
                                                                           weights_dtype(model_dtype, device))
        self.names = sorted(self.params)
        self.sizes = [self.params[n].numel() for n in self.names]
        self.total = sum(self.sizes)
        self.dim = dim
        self.projector = Projector(self.total, dim, run_seed, ckpt_name, block_rows, device, cache_mb,
                                   projection_dtype(proj_dtype, device), sketch_dim)
        # The Linear module holding each LoRA factor: its inputs and output gradients give per-example gradients.
        modules = dict(self.model.named_modules())
        self.modules = {n.replace(".default.", "."): modules[n.rsplit(".", 1)[0]]
                        for n, _ in self.model.named_parameters() if "lora_" in n}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        self.betas, self.eps = tuple(self.meta["betas"]), float(self.meta["eps"])
        # Split the causal LM into backbone and output head, unless the head is adapted or post-processes
        # its logits (soft-capping, scaling): then the full model's logits are used.
        inner = self.model.get_base_model()
        self.backbone, self.head = inner.get_decoder(), inner.get_output_embeddings()
        cfg = inner.config
        self.head_only_on_response = (self.backbone is not None and isinstance(self.head, torch.nn.Linear)
                                      and not any(self.modules[k] is self.head for k in self.names)
                                      and not getattr(cfg, "final_logit_softcapping", None)
                                      and getattr(cfg, "logit_scale", None) in (None, 1.0))
        self.m_flat = torch.cat([self.moments[n][0].reshape(-1) for n in self.names])
        self.v_flat = torch.cat([self.moments[n][1].reshape(-1) for n in self.names])

    def gradients(self, input_ids, attention_mask, labels):
        """[B, P] per-example gradients (flattened in sorted-name order) from ONE batched backward pass.

        A LoRA factor is a Linear layer W (out x in); the gradient of example b is
        sum_t grad_out[b, t] (x) input[b, t]. Forward hooks record every LoRA layer's input and output,
        autograd gives the output gradients, and an einsum assembles the per-example gradients (the Opacus
        technique). The batch loss is the sum of
        each example's own mean response-token loss, so example b's gradient is exactly its own. Right
        padding is inert: causal attention never lets a real token see it, and padded labels are -100,
        so output gradients at padded positions are zero and no attention mask is needed.
        """
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        handles = [self.modules[k].register_forward_hook(partial(self._record, inputs, outputs, k)) for k in self.names]
        try:
            per_example = self._per_example_loss(input_ids, labels)
        finally:
            for h in handles:
                h.remove()
        # Gradients w.r.t. the LoRA layers' outputs only: autograd skips the weights' own (summed) gradients
        # and stops at the lowest LoRA layer.
        grads_out = torch.autograd.grad(per_example.sum(), [outputs[k] for k in self.names])
        parts = [torch.einsum("bto,bti->boi", g, inputs[k]).reshape(input_ids.shape[0], -1)
                 for k, g in zip(self.names, grads_out)]
        return torch.cat(parts, dim=1).float()

    @staticmethod
    def _record(inputs: dict, outputs: dict, key: str, module, args, out) -> None:
        inputs[key] = args[0].detach()
        outputs[key] = out

    def _per_example_loss(self, input_ids, labels):
        """[B] mean response-token loss of each example. The output head runs on response positions only:
        with a large vocabulary, the prompt's logits (which LESS computes and discards) are most of the work."""
        shift_labels = labels[:, 1:]
        if self.head_only_on_response:
            hidden = self.backbone(input_ids=input_ids).last_hidden_state[:, :-1]
            rows, cols = (shift_labels != -100).nonzero(as_tuple=True)
            losses = torch.nn.functional.cross_entropy(self.head(hidden[rows, cols]).float(), shift_labels[rows, cols],
                                                       reduction="none")
            counts = torch.bincount(rows, minlength=input_ids.shape[0]).clamp(min=1).to(losses.dtype)
            return torch.zeros(input_ids.shape[0], dtype=losses.dtype, device=losses.device).index_add(
                0, rows, losses / counts[rows])
        logits = self.model(input_ids=input_ids).logits[:, :-1]
        valid = (shift_labels != -100).float()
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   shift_labels.clamp(min=0).reshape(-1), reduction="none")
        return (losses.view_as(valid) * valid).sum(1) / valid.sum(1).clamp(min=1)

    def features_of(self, examples: list[tuple[list[int], list[int]]], kind: str, pad_id: int,
                    batch_size: int, buffer_mb: int = 256) -> np.ndarray:
        """Features of tokenised examples (input_ids, labels), in their order. Examples are grouped by length
        into gradient calls of `batch_size` so little compute goes to padding; their gradients are gathered
        (up to `buffer_mb`) and projected together, so each block of R is generated or read once per gather."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        out = np.zeros((len(examples), self.dim), np.float16)
        per_row = max(1, buffer_mb * 2**20 // (4 * self.total))
        pending_idx: list[int] = []
        pending: list[torch.Tensor] = []

        def flush():
            if pending_idx:
                out[pending_idx] = self.projector.project(torch.cat(pending)).cpu().numpy().astype(np.float16)
                pending_idx.clear()
                pending.clear()

        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            t = to_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id)
            g = self.gradients(t["input_ids"], t["attention_mask"], t["labels"]).detach()
            pending.append(self.adam_direction(g) if kind == "candidate" else g)
            pending_idx.extend(idx)
            if len(pending_idx) >= per_row:
                flush()
        flush()
        return out

    def adam_direction(self, g):
        """LESS's Adam update direction from the checkpoint's moments (see the module docstring)."""
        b1, b2 = self.betas
        m = b1 * self.m_flat + (1 - b1) * g
        v = b2 * self.v_flat + (1 - b2) * g ** 2
        return m / torch.sqrt(v + self.eps)

    def features(self, input_ids, attention_mask, labels, kind: str) -> np.ndarray:
        """[B, d] float16 features; kind 'candidate' (Adam direction) or 'reference' (plain gradient)."""
        g = self.gradients(input_ids.to(self.device), attention_mask.to(self.device), labels.to(self.device)).detach()
        if kind == "candidate":
            g = self.adam_direction(g)
        return self.projector.project(g).cpu().numpy().astype(np.float16)


def weights_dtype(name: str, device: str) -> torch.dtype:
    """The base model's weights: 'auto' is bfloat16 on GPUs (LESS computes its gradients in bf16; a 7B model
    in float32 leaves no room for a batch's activations) and float32 on CPUs (bf16 is slower there for small
    models). PEFT keeps the LoRA factors in float32 either way; gradients leave `gradients` in float32."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def projection_dtype(name: str, device: str) -> torch.dtype:
    """'auto': bfloat16 where the hardware multiplies it natively (GPUs; CPUs with AVX512-BF16/AMX), else
    float32. R is exact in bfloat16 (+-1); the gradients are rounded to 8 bits of mantissa, which moves
    a projected coordinate by ~0.2% (bench/influence.py), well under the projection's own error at
    d=8192 (~1/sqrt(d) = 1.1%)."""
    if name == "auto":
        fast = device.startswith("cuda") or (torch.backends.mkldnn.is_available()
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class Projector:
    """x [B, P] -> [B, d], the same map for a given (run seed, checkpoint) on every actor and node.

    Dense (P <= sketch_dim, or sketch_dim 0): x R / sqrt(d), R [P, d] Rademacher whose rows come in
    chunks of CHUNK rows, each from its own generator seeded by (run seed, checkpoint, chunk index): the
    same R whatever block size an actor uses to bound its memory (block_rows, rounded to whole chunks).
    Sketched (P > sketch_dim > 0): a CountSketch of x into m = sketch_dim buckets (bucket and sign of each
    coordinate from a splitmix64 hash of (seed, index): integer arithmetic, identical on any device),
    then the dense map above with m rows. The products run in `dtype` and accumulate in float32.
    A cached R is generated on the CPU (the same signs on CPU and GPU actors) and kept on `device`."""

    CHUNK = 1024
    SKETCH_COLUMNS = 1 << 24  # coordinates hashed/added at a time: bounds the temporaries to ~B x 16M floats

    def __init__(self, total: int, dim: int, run_seed: int, ckpt: str, block_rows: int, device: str = "cpu",
                 cache_mb: int = 1024, dtype: torch.dtype = torch.float32, sketch_dim: int = 0):
        self.total, self.dim, self.device, self.dtype = total, dim, device, dtype
        self.sketch_dim = sketch_dim if 0 < sketch_dim < total else 0
        self.rows = self.sketch_dim or total  # rows of the dense R
        self.chunks_per_block = max(1, block_rows // self.CHUNK)
        self.block_rows = self.chunks_per_block * self.CHUNK
        self.base = int.from_bytes(hashlib.sha256(f"{run_seed}:{ckpt}".encode()).digest()[:6], "big")
        self.n_blocks = -(-self.rows // self.block_rows)
        # Blocks are kept ready for the matmul when the whole matrix fits in cache_mb; a sketched R always
        # is (m x d is the point of the sketch: 2 GiB in bfloat16 at the defaults).
        fits = self.rows * dim * dtype.itemsize <= cache_mb * 2**20
        self.cache: Optional[list] = [] if fits or self.sketch_dim else None
        self.gen_device = "cpu" if self.cache is not None else device
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        self.signs_of_byte = (1 - 2 * bits).to(dtype).to(self.gen_device)  # [256, 8]: bit 1 -> -1, bit 0 -> +1
        self._sketch: Optional[list] = None

    def _chunk(self, c: int):
        rows = min(self.CHUNK, self.rows - c * self.CHUNK)
        # One random byte gives 8 signs through a 256-row lookup table: 8x fewer draws and no arithmetic on
        # the big matrix (4.7x faster than one draw per sign on CPU). An uncached R (dense map of a big
        # adapter, sketch_dim 0) is regenerated per pass where it is used (Philox on GPU).
        gen = torch.Generator(device=self.gen_device).manual_seed(self.base + c)
        n = rows * self.dim
        draws = torch.randint(0, 256, (-(-n // 8),), generator=gen, dtype=torch.int64, device=self.gen_device)
        return self.signs_of_byte.index_select(0, draws).view(-1)[:n].view(rows, self.dim).to(self.device)

    def block(self, b: int):
        if self.cache is not None and b < len(self.cache):
            return self.cache[b]
        first = b * self.chunks_per_block
        last = min(first + self.chunks_per_block, -(-self.rows // self.CHUNK))
        signs = torch.cat([self._chunk(c) for c in range(first, last)])
        if self.cache is not None and b == len(self.cache):
            self.cache.append(signs)
        return signs

    def sketch_parts(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """[(first column, bucket [n] int64, sign [n] float32)] over the P coordinates, on `device`."""
        if self._sketch is None:
            self._sketch = []
            for lo in range(0, self.total, self.SKETCH_COLUMNS):
                h = splitmix64(np.arange(lo, min(lo + self.SKETCH_COLUMNS, self.total), dtype=np.uint64)
                               + np.uint64(self.base << 16))
                bucket = torch.from_numpy((h % np.uint64(self.sketch_dim)).astype(np.int64))
                sign = torch.from_numpy(1.0 - 2.0 * (h >> np.uint64(63)).astype(np.float32))
                self._sketch.append((lo, bucket.to(self.device), sign.to(self.device)))
        return self._sketch

    def sketch(self, x):
        """[B, P] -> [B, m] CountSketch (float32)."""
        out = torch.zeros(x.shape[0], self.sketch_dim, dtype=torch.float32, device=x.device)
        for lo, bucket, sign in self.sketch_parts():
            out.index_add_(1, bucket, x[:, lo:lo + bucket.shape[0]].float() * sign)
        return out

    def prepare(self) -> None:
        """Generate the cached blocks (and the sketch's hashes) now: start-up, not per-batch work. Nothing
        when R is too large to cache (a dense map of a big adapter: it is regenerated per use)."""
        if self.cache is not None:
            for b in range(self.n_blocks):
                self.block(b)
        if self.sketch_dim:
            self.sketch_parts()

    def matrix(self):
        """The whole map as a [P, d] float32 matrix, unscaled (for tests and small models)."""
        dense = torch.cat([self.block(b).float() for b in range(self.n_blocks)])
        if not self.sketch_dim:
            return dense
        return torch.cat([dense.index_select(0, bucket) * sign[:, None] for _, bucket, sign in self.sketch_parts()])

    def project(self, x):
        if self.sketch_dim:
            x = self.sketch(x)
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        for b in range(self.n_blocks):
            lo = b * self.block_rows
            block = self.block(b)
            out += (x[:, lo:lo + block.shape[0]].to(self.dtype) @ block).float()
        return out / self.dim ** 0.5


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a well-mixed hash of each value."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def to_batch(input_ids: list, labels: list, pad_id: int) -> dict[str, Any]:
    from scoder_ray.train.data import collate

    return collate(list(zip(input_ids, labels)), pad_id)
