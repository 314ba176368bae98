"""Per-example LoRA gradient features, optimizer-aware, randomly projected (LESS-style).

For a LoRA checkpoint with parameters theta and the warm-up's Adam moments (m, v, betas b1, b2, eps):

- per-example gradient g_i of the example's mean response-token loss w.r.t. the LoRA parameters,
  computed for many examples at once with `torch.func.vmap(grad(...))`; each example is a batch of one
  inside vmap, right-padded (causal attention never looks ahead) with label -100 on padding, so g_i
  does not depend on batch-mates;
- candidates (training data) use the Adam update direction, exactly as LESS computes it:
      m' = b1 * m + (1 - b1) * g,   v' = b2 * v + (1 - b2) * g**2,   u = m' / sqrt(v' + eps)
  (eps inside the square root, no bias correction: a per-checkpoint scalar that cosine ignores);
- references (teacher samples) use the plain gradient g;
- the flat vector (parameters in sorted-name order) is projected to d dimensions by R / sqrt(d), R a
  Rademacher (+-1) matrix whose rows are generated block by block from (run seed, checkpoint, block):
  every actor on every node derives the same R without shipping it, and memory stays one block.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _torch():
    import torch

    return torch


class MissingMomentsError(FileNotFoundError):
    pass


def load_checkpoint(base_model: str, ckpt_dir: str, device: str = "cpu"):
    """(model in eval mode, LoRA params {adapter key: tensor}, moments {key: (m, v)}, optimizer meta)."""
    torch = _torch()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    opt_dir = Path(ckpt_dir) / "optimizer"
    if not (opt_dir / "exp_avg.safetensors").is_file():
        raise MissingMomentsError(f"{ckpt_dir}: no Adam moments (optimizer/exp_avg.safetensors); influence needs a "
                                  "LoRA warm-up checkpoint written by the training stage")
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
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
                 block_rows: int = 4096, device: str = "cpu", cache_mb: int = 1024):
        torch = _torch()
        self.device = device
        self.model, self.params, self.moments, self.meta = load_checkpoint(base_model, ckpt_dir, device)
        self.names = sorted(self.params)
        self.sizes = [self.params[n].numel() for n in self.names]
        self.total = sum(self.sizes)
        self.dim = dim
        self.projector = Projector(self.total, dim, run_seed, ckpt_name, block_rows, device, cache_mb)
        # Full names inside the PEFT model, for functional_call.
        self.full_names = {n.replace(".default.", "."): n for n, _ in self.model.named_parameters() if "lora_" in n}
        self.betas, self.eps = tuple(self.meta["betas"]), float(self.meta["eps"])
        self.m_flat = torch.cat([self.moments[n][0].reshape(-1) for n in self.names])
        self.v_flat = torch.cat([self.moments[n][1].reshape(-1) for n in self.names])

    def gradients(self, input_ids, attention_mask, labels):
        """[B, P] per-example gradients (flattened in sorted-name order), vectorised with torch.func."""
        torch = _torch()
        from torch.func import functional_call, grad, vmap

        model, full = self.model, self.full_names
        fixed = {k: v for k, v in model.named_parameters() if "lora_" not in k}
        fixed.update(dict(model.named_buffers()))

        def loss_fn(lora: dict, ids, mask, lab):
            # No attention mask inside vmap (transformers' mask helpers branch on its values). Right padding
            # under causal attention cannot reach the real tokens, and padded labels are -100, so the loss
            # and its gradient are those of the unpadded example.
            params = {**fixed, **{full[k]: v for k, v in lora.items()}}
            logits = functional_call(model, params, (ids[None],)).logits[0]
            shift_logits, shift_labels = logits[:-1], lab[1:]
            valid = shift_labels != -100
            losses = torch.nn.functional.cross_entropy(shift_logits, shift_labels.clamp(min=0), reduction="none")
            return (losses * valid).sum() / valid.sum().clamp(min=1)

        lora = {n: self.params[n] for n in self.names}
        grads = vmap(grad(loss_fn), in_dims=(None, 0, 0, 0))(lora, input_ids, attention_mask, labels)
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)

    def adam_direction(self, g):
        """LESS's Adam update direction from the checkpoint's moments (see the module docstring)."""
        b1, b2 = self.betas
        m = b1 * self.m_flat + (1 - b1) * g
        v = b2 * self.v_flat + (1 - b2) * g ** 2
        return m / _torch().sqrt(v + self.eps)

    def features(self, input_ids, attention_mask, labels, kind: str) -> np.ndarray:
        """[B, d] float16 features; kind 'candidate' (Adam direction) or 'reference' (plain gradient)."""
        g = self.gradients(input_ids.to(self.device), attention_mask.to(self.device), labels.to(self.device)).detach()
        if kind == "candidate":
            g = self.adam_direction(g)
        return self.projector.project(g).cpu().numpy().astype(np.float16)


class Projector:
    """x [B, P] -> x R / sqrt(d), R [P, d] Rademacher. R's rows come in chunks of CHUNK rows, each from
    its own generator seeded by (run seed, checkpoint, chunk index): R is the same on every actor and
    node whatever block size each uses to bound its memory (block_rows, rounded to whole chunks)."""

    CHUNK = 1024

    def __init__(self, total: int, dim: int, run_seed: int, ckpt: str, block_rows: int, device: str = "cpu",
                 cache_mb: int = 1024):
        self.total, self.dim, self.device = total, dim, device
        self.chunks_per_block = max(1, block_rows // self.CHUNK)
        self.block_rows = self.chunks_per_block * self.CHUNK
        self.base = int.from_bytes(hashlib.sha256(f"{run_seed}:{ckpt}".encode()).digest()[:6], "big")
        self.n_blocks = -(-total // self.block_rows)
        self.cache: Optional[list] = [] if total * dim <= cache_mb * 2**20 else None  # int8 signs, if they fit

    def _chunk(self, c: int):
        torch = _torch()
        rows = min(self.CHUNK, self.total - c * self.CHUNK)
        # Generated where it is used (Philox on GPU): the same R for every actor on the same kind of device.
        gen = torch.Generator(device=self.device).manual_seed(self.base + c)
        return torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8, device=self.device) * 2 - 1

    def block(self, b: int):
        torch = _torch()
        if self.cache is not None and b < len(self.cache):
            return self.cache[b]
        first = b * self.chunks_per_block
        last = min(first + self.chunks_per_block, -(-self.total // self.CHUNK))
        signs = torch.cat([self._chunk(c) for c in range(first, last)])
        if self.cache is not None and b == len(self.cache):
            self.cache.append(signs)
        return signs

    def matrix(self):
        """The whole R (for tests and small models)."""
        torch = _torch()
        return torch.cat([self.block(b) for b in range(self.n_blocks)]).float()

    def project(self, x):
        torch = _torch()
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        for b in range(self.n_blocks):
            lo = b * self.block_rows
            block = self.block(b)
            out += x[:, lo:lo + block.shape[0]].float() @ block.float()
        return out / self.dim ** 0.5


def to_batch(input_ids: list, labels: list, pad_id: int) -> dict[str, Any]:
    from scoder_ray.train.data import collate

    return collate(list(zip(input_ids, labels)), pad_id)
