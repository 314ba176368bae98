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

    .venv/bin/python bench/influence.py --case smollm2-r128 [--candidates 256] [--references 16] [--threads 2]

The projection at adapter sizes where it costs (issue 20): SmolLM2-135M with LoRA r=128 on q/k/v/o (14.7M
parameters), d=8192. Two real warm-up checkpoints (LoRA + AdamW in this process, saved as the training stage
saves them). Each example's full per-example gradient is computed once per checkpoint (the kernel's
`gradients`, Adam direction for candidates) and given to three maps:
- exact: the unprojected cosine to the mean of the unit reference gradients;
- today's dense Rademacher (sketch_dim 0): P x d, too large to cache, so `features_of` regenerates it on
  every pass of buffer_mb of gradients; here applied in ONE pass over all rows (its cheapest case) and
  its per-pass regeneration time measured;
- the sketched map (influence.sketch_dim): CountSketch to m buckets, then the cached m x d Rademacher;
- the alternative, block-diagonal: one Rademacher block per LoRA tensor with d_k of the d dims by size.
Prints, per kernel, examples/s = rows / (gradient time + projection time), today's at the configured
buffer (passes x regeneration + products), the Spearman of the final influence scores (summed over the
checkpoints, as the stage's output) against exact and against dense, the top-5% overlaps, and peak RSS.
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


def enough_rows(n: int) -> list:
    """n real rows (each stdlib function its own seed: 366 of them, where the copy-gated pairs are 117)."""
    from scoder_ray.seeds import documented_functions

    rows = documented_functions(n, seed="itself")
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} documented stdlib functions here; ask for at most that many rows")
    return rows


class BlockDiagonal:
    """The alternative measured against the sketch: one Rademacher block per LoRA tensor, d_k of the d dims in
    proportion to its size (LoGra/GraSS-like per-module projection, but on the full Adam-transformed vector)."""

    def __init__(self, sizes: list, dim: int, seed: int):
        total = sum(sizes)
        self.dims = [max(1, round(dim * s / total)) for s in sizes]
        self.blocks = []
        for k, (size, d) in enumerate(zip(sizes, self.dims)):
            gen = torch.Generator().manual_seed(seed * 100_003 + k)
            self.blocks.append((torch.randint(0, 2, (size, d), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.bfloat16))
        self.sizes = sizes

    def project(self, x):
        parts, at = [], 0
        for size, d, r in zip(self.sizes, self.dims, self.blocks):
            parts.append((x[:, at:at + size].to(torch.bfloat16) @ r).float() / d ** 0.5)
            at += size
        return torch.cat(parts, dim=1)


def warm_up_lora(base: str, rows: list, tok, out: Path, epochs: int, max_len: int) -> list[str]:
    """LoRA r=128 (alpha 512, q/k/v/o, as LESS) trained with AdamW on `rows`, one checkpoint per epoch, saved
    as the training stage saves warm-up checkpoints (adapter + optimizer/ moments + optimizer.json)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from scoder_ray.influence.features import to_batch
    from scoder_ray.train.data import encode, prompt_response

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=128, lora_alpha=512, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    named = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(list(named.values()), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    examples = [encode(tok, *prompt_response(r, "synthesizer"), max_len)[:2] for r in rows]
    ckpts, step = [], 0
    for epoch in range(epochs):
        for lo in range(0, len(examples), 4):
            b = to_batch([e[0] for e in examples[lo:lo + 4]], [e[1] for e in examples[lo:lo + 4]], tok.pad_token_id)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        d = out / f"ckpt_{epoch + 1:02d}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "optimizer").mkdir()
        for kind in ("exp_avg", "exp_avg_sq"):
            save_file({k: opt.state[p][kind].contiguous() for k, p in named.items()}, d / "optimizer" / f"{kind}.safetensors")
        (d / "optimizer" / "optimizer.json").write_text(json.dumps({"step": step, "betas": [0.9, 0.999], "eps": 1e-8,
                                                                    "lr": 2e-5}))
        ckpts.append(str(d))
    return ckpts


def smollm2_case(args) -> None:
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    from scoder_ray.influence.features import GradientFeatures, Projector, to_batch
    from scoder_ray.influence.stage import influence_scores
    from scoder_ray.tiny import resolve_model
    from scoder_ray.train.data import encode, prompt_response

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-r128-"))
    base = resolve_model("builtin:smollm2-135m", "~/.cache/scoder-ray")
    tok = AutoTokenizer.from_pretrained(base)
    rows = enough_rows(args.candidates + args.references + args.warmup_rows)
    cand_rows, ref_rows = rows[:args.candidates], rows[args.candidates:args.candidates + args.references]
    t = time.perf_counter()
    ckpts = warm_up_lora(base, rows[args.candidates + args.references:], tok, tmp, 2, args.max_len)
    warmup_s = time.perf_counter() - t

    def encoded(part):
        return [encode(tok, *prompt_response(r, "synthesizer"), args.max_len)[:2] for r in part]

    cands, refs = encoded(cand_rows), encoded(ref_rows)
    # "sketch_b" is the same sketch under another seed: how far two independent random maps of this size agree
    # with each other is the noise floor for any comparison between two maps (sketch vs today's dense).
    scores = {k: {} for k in ("exact", "dense", "sketch", "sketch_b", "blockdiag")}
    timing = {"gradient_s": 0.0, "sketch_project_s": 0.0, "sketch_prepare_s": 0.0, "blockdiag_project_s": 0.0,
              "blockdiag_prepare_s": 0.0, "dense_regenerate_s": 0.0,
              "dense_products_s": 0.0}
    lora_params = 0
    with PeakRSS() as mem:
        for ckpt in ckpts:
            name = Path(ckpt).name
            feats = GradientFeatures(base, ckpt, name, dim=args.dim, run_seed=0, proj_dtype="auto", sketch_dim=0)
            lora_params, dtype = feats.total, feats.projector.dtype
            t = time.perf_counter()
            sketch = Projector(feats.total, args.dim, 0, name, 4096, "cpu", dtype=dtype, sketch_dim=args.sketch_dim)
            sketch.prepare()
            timing["sketch_prepare_s"] += time.perf_counter() - t
            sketch_b = Projector(feats.total, args.dim, 1, name, 4096, "cpu", dtype=dtype, sketch_dim=args.sketch_dim)
            sketch_b.prepare()
            t = time.perf_counter()
            blockdiag = BlockDiagonal(feats.sizes, args.dim, int(name[-2:]))
            timing["blockdiag_prepare_s"] += time.perf_counter() - t
            proj_bd: dict[str, list] = {"candidate": [], "reference": []}
            # Gradients for the one dense pass (bf16), written in place: a list then torch.cat held two copies.
            stacked = {"reference": torch.empty(len(refs), feats.total, dtype=torch.bfloat16),
                       "candidate": torch.empty(len(cands), feats.total, dtype=torch.bfloat16)}
            proj: dict[str, list] = {"candidate": [], "reference": []}
            proj_b: dict[str, list] = {"candidate": [], "reference": []}
            exact_parts: list = []
            ref_unit_mean = None
            for kind, examples in (("reference", refs), ("candidate", cands)):
                for lo in range(0, len(examples), args.batch):
                    chunk = examples[lo:lo + args.batch]
                    t = time.perf_counter()
                    b = to_batch([e[0] for e in chunk], [e[1] for e in chunk], tok.pad_token_id)
                    g = feats.gradients(b["input_ids"], b["attention_mask"], b["labels"]).detach()
                    if kind == "candidate":
                        g = feats.adam_direction(g)
                    timing["gradient_s"] += time.perf_counter() - t
                    t = time.perf_counter()
                    proj[kind].append(sketch.project(g))
                    timing["sketch_project_s"] += time.perf_counter() - t
                    proj_b[kind].append(sketch_b.project(g))
                    t = time.perf_counter()
                    proj_bd[kind].append(blockdiag.project(g))
                    timing["blockdiag_project_s"] += time.perf_counter() - t
                    unit = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    if kind == "reference":
                        ref_unit_mean = unit.sum(0) if ref_unit_mean is None else ref_unit_mean + unit.sum(0)
                    else:
                        exact_parts.append((unit @ (ref_unit_mean / len(refs))).numpy())
                    stacked[kind][lo:lo + len(chunk)] = g.to(torch.bfloat16)
            scores["exact"][name] = np.concatenate(exact_parts)
            feats_new = {k: torch.cat(v).numpy() for k, v in proj.items()}
            feats_b = {k: torch.cat(v).numpy() for k, v in proj_b.items()}
            feats_bd = {k: torch.cat(v).numpy() for k, v in proj_bd.items()}
            del blockdiag, sketch, sketch_b
            # Today's dense map over every row in one pass: each block of R generated once, then multiplied.
            dense_out = {k: torch.zeros(v.shape[0], args.dim) for k, v in stacked.items()}
            dense = feats.projector
            for blk in range(dense.n_blocks):
                t = time.perf_counter()
                r = dense.block(blk)
                timing["dense_regenerate_s"] += time.perf_counter() - t
                t = time.perf_counter()
                lo = blk * dense.block_rows
                for k in stacked:
                    dense_out[k] += (stacked[k][:, lo:lo + r.shape[0]].to(dense.dtype) @ r).float()
                timing["dense_products_s"] += time.perf_counter() - t
            del stacked
            for k, mine in (("dense", {kk: v.numpy() for kk, v in dense_out.items()}), ("sketch", feats_new),
                            ("sketch_b", feats_b), ("blockdiag", feats_bd)):
                scores[k][name] = influence_scores({name: mine["candidate"]}, {name: mine["reference"]}, {name: 1.0})
            del feats, dense_out
    final = {k: sum(v.values()) for k, v in scores.items()}
    n, n_ck = len(cands), len(ckpts)
    per_row = max(1, 256 * 2**20 // (4 * lora_params))  # rows per pass at today's default buffer_mb
    passes = -(-n // per_row) + -(-len(refs) // per_row)
    today_s = timing["gradient_s"] + passes * timing["dense_regenerate_s"] + timing["dense_products_s"]
    new_s = timing["gradient_s"] + timing["sketch_project_s"]

    def top(x, frac=0.05):
        k = max(1, round(frac * len(x)))
        return set(np.argsort(-x)[:k].tolist())

    def agree(a, b):
        return {"spearman": round(float(spearmanr(final[a], final[b]).statistic), 4),
                "top5pct_overlap": round(len(top(final[a]) & top(final[b])) / len(top(final[a])), 3),
                # 13 rows of 256 make the top 5% one row = 7.7 points; the top 10% is half as coarse
                "top10pct_overlap": round(len(top(final[a], 0.1) & top(final[b], 0.1)) / len(top(final[a], 0.1)), 3)}

    print(json.dumps({
        "case": "smollm2-r128", "candidates": n, "references": len(refs), "checkpoints": n_ck, "lora_params": lora_params,
        "proj_dim": args.dim, "sketch_dim": args.sketch_dim, "threads": args.threads, "warmup_s": round(warmup_s, 1),
        "seconds": {k: round(v, 1) for k, v in timing.items()},
        "today_rows_per_pass": per_row, "today_passes_per_checkpoint": passes,
        "today_examples_per_s": round(n * n_ck / today_s, 3), "sketch_examples_per_s": round(n * n_ck / new_s, 3),
        "speedup_sketch_over_today": round(today_s / new_s, 1),
        "projection_share_sketch": round(timing["sketch_project_s"] / new_s, 3),
        "projection_share_today": round(1 - timing["gradient_s"] / today_s, 3),
        "sketch_vs_exact": agree("sketch", "exact"), "dense_vs_exact": agree("dense", "exact"),
        "sketch_vs_dense": agree("sketch", "dense"),
        # the noise floor of two independent maps: the same sketch under another seed, against both
        "sketch_b_vs_sketch": agree("sketch_b", "sketch"), "sketch_b_vs_dense": agree("sketch_b", "dense"),
        "sketch_b_vs_exact": agree("sketch_b", "exact"),
        "blockdiag_examples_per_s": round(n * n_ck / (timing["gradient_s"] + timing["blockdiag_project_s"]), 3),
        "blockdiag_vs_exact": agree("blockdiag", "exact"), "blockdiag_vs_dense": agree("blockdiag", "dense"),
        "peak_rss_gib": round(mem.peak / 2**30, 2),
    }, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["tiny", "smollm2-r128"], default="tiny")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--references", type=int, default=None, help="default: 8 (tiny), 16 (smollm2-r128)")
    ap.add_argument("--threads", type=int, default=2, help="smollm2-r128: torch threads")
    ap.add_argument("--sketch-dim", type=int, default=131072, help="smollm2-r128: CountSketch buckets")
    ap.add_argument("--warmup-rows", type=int, default=32, help="smollm2-r128: rows of the LoRA warm-up")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--actors", type=int, default=os.cpu_count(), help="feature actors of the stage, one core each")
    ap.add_argument("--proj-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()
    if args.case == "smollm2-r128":
        args.references = args.references or 16
        return smollm2_case(args)
    args.references = args.references or 8

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    from scoder_ray.config import load_config
    from scoder_ray.influence.features import GradientFeatures
    from scoder_ray.influence.stage import compute_features, influence_scores, read_features
    from scoder_ray.store import RunStore
    from scoder_ray.tiny import resolve_model
    from scoder_ray.train.data import encode, prompt_response
    from scoder_ray.train.stage import run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-"))
    rows = enough_rows(args.candidates + args.references)
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
