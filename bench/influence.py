"""Influence features: our feature stage and its kernel against a faithful LESS-style reference, same everything.

    .venv/bin/python bench/influence.py [--candidates 256] [--dim 8192] [--batch 4] [--actors N]

A real LoRA warm-up checkpoint of the tiny model is trained first (the training stage, 2 workers).
Then, on the same candidates, references (teacher-like rows), d and projection matrix:
- LESS-style: one example at a time — forward, backward, flatten, the same Adam transform, one dense
  projection matrix multiply — in this process with every core as torch threads;
- ours, the kernel: `GradientFeatures.features_of` in this process with the same threads — length-sorted
  batches, per-example gradients from one backward (output head on response tokens only), Adam
  transform, block projection;
- ours, the stage as users run it: `compute_features` (Ray Data over N FeatureActors, default one per
  core with one thread each, one block of candidates each): its examples/s while the actors work, and
  its fixed costs (read, actor start-up with imports, model and projection matrix, write) apart.
Prints examples/s of each, the ratios to LESS (goal >= 3 on CPU), peak RSS of each (the stage: all its
actors together), and the Spearman correlation between the influence score lists (goal >= 0.99).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch



class PeakRSS:
    """Peak resident memory, sampled every 20 ms: of this process, or summed over the processes whose command
    line contains `match` (Ray actors)."""

    def __init__(self, match: str = ""):
        self.match = match

    def rss(self) -> int:
        if not self.match:
            return psutil.Process().memory_info().rss
        total = 0
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if self.match in " ".join(proc.info["cmdline"] or []):
                    total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()

        def watch():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.rss())
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
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--references", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--actors", type=int, default=os.cpu_count(), help="feature actors of the stage, one core each")
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
    from scoder_ray.influence.stage import compute_features, influence_scores, read_features
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
    max_len = 512

    def encoded(part):
        return [encode(tok, *prompt_response(r, "synthesizer"), max_len)[:2] for r in part]

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
    threads, lora_params = torch.get_num_threads(), feats.total
    del feats, matrix

    # The stage: the same candidates through Ray Data and the feature actors, as `iter_TT/influence` runs them.
    (tmp / "cands").mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "cand_id": f"c{i:05d}"} for i, r in enumerate(rows[:args.candidates])]),
                   tmp / "cands" / "part-0.parquet")
    conf = dataclasses.replace(cfg.influence, proj_dim=args.dim, batch_size=args.batch, max_len=max_len,
                               proj_dtype=args.proj_dtype, num_actors=args.actors, cpus_per_actor=1,
                               sort_window=-(-args.candidates // args.actors))
    ray.init(num_cpus=args.actors, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    with PeakRSS("FeatureActor") as stage_mem:
        t = time.perf_counter()
        done = compute_features(str(tmp / "cands"), str(tmp / "feats"), base, ckpt, "ckpt_01", "candidate", conf, seed=0, models=cfg.models)
        stage_s = time.perf_counter() - t
    ray.shutdown()
    ids, stage_c = read_features(str(tmp / "feats"))
    stage_c = stage_c[np.argsort(ids)]
    # Work: the actors' time in calls, side by side when each actor took one of the `actors` blocks
    # (else counted as serial); the rest of the wall time is fixed cost (read, actor start-up, write).
    worked = int((pq.read_table(tmp / "feats", columns=["actor_start_s"]).column("actor_start_s").to_numpy() > 0).sum())
    stage_work_s = done["actor_busy_s"] / (args.actors if worked == args.actors else 1)

    def scores(c, r):
        return influence_scores({"k": c.astype(np.float32)}, {"k": r.astype(np.float32)}, {"k": 1.0})

    less = scores(ref_c, ref_r)
    print(json.dumps({
        "candidates": len(cands), "references": len(refs), "lora_params": lora_params,
        "proj_dim": args.dim, "proj_dtype": args.proj_dtype, "batch": args.batch, "cpus": os.cpu_count(),
        "less_examples_per_s": round(len(cands) / ref_s, 2), "less_threads": threads,
        "kernel_examples_per_s": round(len(cands) / ours_s, 2), "kernel_threads": threads,
        "kernel_ratio_over_less": round(ref_s / ours_s, 2),
        "stage_actors": args.actors, "stage_actors_that_worked": worked, "stage_threads_per_actor": 1, "stage_wall_s": round(stage_s, 2),
        "stage_actor_start_s_each": round(done["actor_start_s"] / args.actors, 2),
        "stage_fixed_s": round(stage_s - stage_work_s, 2),
        "stage_examples_per_s_working": round(len(cands) / stage_work_s, 2),
        "stage_ratio_over_less": round(ref_s / stage_work_s, 2),
        "stage_examples_per_s_wall": round(len(cands) / stage_s, 2),
        "peak_rss_gib": {"less": round(ref_mem.peak / 2**30, 2), "kernel": round(ours_mem.peak / 2**30, 2),
                         "stage_all_actors": round(stage_mem.peak / 2**30, 2)},
        "spearman_scores": {"kernel_vs_less": round(float(spearmanr(scores(ours_c, ours_r), less).statistic), 5),
                            "stage_vs_less": round(float(spearmanr(scores(stage_c, ours_r), less).statistic), 5)},
    }, indent=2))


if __name__ == "__main__":
    main()
