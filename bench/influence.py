"""Influence features: our vectorised kernel against a faithful LESS-style reference, same everything.

    .venv/bin/python bench/influence.py [--candidates 64] [--dim 8192] [--batch 8]

A real LoRA warm-up checkpoint of the tiny model is trained first (the training stage, 2 workers).
Then, on the same candidates, references (teacher-like rows), d and projection matrix:
- ours: `GradientFeatures.features_of` — length-sorted batches, per-example gradients from one backward
  (output head on response tokens only), Adam transform, block projection;
- LESS-style: one example at a time — forward, backward, flatten, the same Adam transform, one dense
  projection matrix multiply.
Prints examples/s of each, the ratio (goal >= 3 on CPU), peak RSS during each phase, and the Spearman
correlation between the two influence score lists (goal >= 0.99).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch



class PeakRSS:
    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        proc = psutil.Process()

        def watch():
            while not self.stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.02)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def less_reference(feats, examples, kind: str, matrix: torch.Tensor) -> np.ndarray:
    """Batch size 1: forward, backward, flatten, Adam transform, dense projection."""
    model = feats.model
    named = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    for p in named.values():
        p.requires_grad_(True)
    out = []
    for ids, labels in examples:
        model.zero_grad()
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        g = torch.cat([named[n].grad.reshape(-1) for n in feats.names])
        if kind == "candidate":
            g = feats.adam_direction(g)
        out.append((g @ matrix / matrix.shape[1] ** 0.5).numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--references", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--proj-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    from scoder_ray.config import load_config
    from scoder_ray.seeds import documented_functions
    from scoder_ray.influence.features import GradientFeatures
    from scoder_ray.influence.stage import influence_scores
    from scoder_ray.store import RunStore
    from scoder_ray.tiny import resolve_model
    from scoder_ray.train.data import encode, prompt_response
    from scoder_ray.train.stage import run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-"))
    rows = documented_functions(args.candidates + args.references)
    pq.write_table(pa.Table.from_pylist(rows), tmp / "rows.parquet")
    cfg = load_config("tiny", [f"run.root={tmp}", "run.id=bench", "train.synthesizer.lora.enabled=true",
                               "train.synthesizer.lora.r=8", "train.synthesizer.lora.alpha=32", "train.synthesizer.epochs=1",
                               "train.synthesizer.num_checkpoints=1"])
    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    done = run_train(cfg, RunStore.for_config(cfg), "train_synthesizer", data=str(tmp / "rows.parquet"))
    ray.shutdown()
    ckpt = str(Path(RunStore.for_config(cfg).path("train_synthesizer")) / done["checkpoints"][-1]["name"])
    base = resolve_model(cfg.models.synthesizer, cfg.models.cache_dir)
    tok = AutoTokenizer.from_pretrained(ckpt)

    def encoded(part):
        return [encode(tok, *prompt_response(r, "synthesizer"), 512)[:2] for r in part]

    cands, refs = encoded(rows[:args.candidates]), encoded(rows[args.candidates:])
    feats = GradientFeatures(base, ckpt, "ckpt_01", dim=args.dim, run_seed=0, proj_dtype=args.proj_dtype)
    matrix = feats.projector.matrix()  # the same R for both, materialised once for the reference
    feats.features_of(cands[:2], "candidate", tok.pad_token_id, args.batch)  # warm-up

    with PeakRSS() as ours_mem:
        t = time.perf_counter()
        ours_c = feats.features_of(cands, "candidate", tok.pad_token_id, args.batch)
        ours_s = time.perf_counter() - t
    ours_r = feats.features_of(refs, "reference", tok.pad_token_id, args.batch)
    with PeakRSS() as ref_mem:
        t = time.perf_counter()
        ref_c = less_reference(feats, cands, "candidate", matrix)
        ref_s = time.perf_counter() - t
    ref_r = less_reference(feats, refs, "reference", matrix)

    ours = influence_scores({"k": ours_c.astype(np.float32)}, {"k": ours_r.astype(np.float32)}, {"k": 1.0})
    theirs = influence_scores({"k": ref_c}, {"k": ref_r}, {"k": 1.0})
    print(json.dumps({
        "candidates": len(cands), "references": len(refs), "lora_params": feats.total, "proj_dim": args.dim,
        "proj_dtype": str(feats.projector.dtype), "batch": args.batch,
        "ours_examples_per_s": round(len(cands) / ours_s, 2), "less_examples_per_s": round(len(cands) / ref_s, 2),
        "ratio_ours_over_less": round(ref_s / ours_s, 2),
        "peak_rss_gib": {"ours": round(ours_mem.peak / 2**30, 2), "less": round(ref_mem.peak / 2**30, 2)},
        "spearman_scores": round(float(spearmanr(ours, theirs).statistic), 5),
    }, indent=2))


if __name__ == "__main__":
    main()
