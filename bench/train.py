"""Training throughput: our Ray Train + DeepSpeed path against a plain single-process PyTorch loop.

    .venv/bin/python bench/train.py [--model tiny|smollm2] [--steps 30] [--zero 2]

Same model, same tokenized rows, same total batch per optimizer step (2 workers x micro x accum for
ours; micro-batches accumulated in one process for the baseline), same AdamW and lr schedule, one run.
Prints tokens/s of the optimizer steps for each and their ratio (ours / plain), where our wall time
goes (Ray and worker start-up, tokenization, steps, export), and peak RSS per process.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def plain_loop(model_path: str, tokenized: str, steps: int, per_step: int, micro: int, lr: float, max_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scoder_ray.config import TrainConf
    from scoder_ray.train.data import Schedule, collate, lr_lambda, read_examples

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    examples = read_examples(tokenized, False, max_len)
    accum = per_step // micro
    sched = Schedule(len(examples), 1, micro, accum, 1, steps, 0, lengths=[len(ids) for ids, _ in examples],
                     group_steps=TrainConf.length_group_steps)  # the steps ours takes
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0.03, "cosine"))
    tokens, step_time = 0, 0.0
    for step in range(steps):
        start = time.perf_counter()
        for m in range(accum):
            batch = collate([examples[i] for i in sched.indices(step, m, 0)], tok.pad_token_id)
            (model(**batch).loss / accum).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        step_time += time.perf_counter() - start
    return {"tokens_per_s": tokens / step_time, "step_seconds": step_time,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from scoder_ray.config import load_config
    from scoder_ray.seeds import documented_functions
    from scoder_ray.store import RunStore
    from scoder_ray.train.stage import run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    pq.write_table(pa.Table.from_pylist(documented_functions(128)), tmp / "rows.parquet")
    ref = "builtin:tiny" if args.model == "tiny" else "builtin:smollm2-135m"
    max_len = 512
    cfg = load_config("tiny", [f"run.root={tmp}", "run.id=bench", f"models.synthesizer={ref}",
                               f"train.synthesizer.zero_stage={args.zero}", f"train.synthesizer.max_steps={args.steps}",
                               "train.synthesizer.checkpoint_at=steps", "train.synthesizer.num_checkpoints=1",
                               f"train.synthesizer.micro_batch_size={args.micro}", f"train.synthesizer.max_len={max_len}",
                               "train.synthesizer.lr=1e-4"])
    t0 = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    store = RunStore.for_config(cfg)
    t1 = time.perf_counter()
    run_train(cfg, store, "train_synthesizer", data=str(tmp / "rows.parquet"))
    stage_wall = time.perf_counter() - t1
    ray.shutdown()
    out = Path(store.path("train_synthesizer"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sum(m["step_time_s"] for m in metrics)
    ours_tps = sum(m["tokens"] for m in metrics) / step_seconds

    from scoder_ray.tiny import resolve_model

    model_path = resolve_model(ref, cfg.models.cache_dir)
    plain = plain_loop(model_path, str(out / "tokenized"), args.steps, 2 * args.micro, args.micro, 1e-4, max_len)
    print(json.dumps({
        "model": args.model, "steps": args.steps, "sequences_per_step": 2 * args.micro, "zero_stage": args.zero,
        "ours_tokens_per_s": round(ours_tps, 1),
        "plain_tokens_per_s": round(plain["tokens_per_s"], 1),
        "ratio_ours_over_plain": round(ours_tps / plain["tokens_per_s"], 3),
        "ours_wall_s": {"ray_init": round(ray_start, 1), "stage_total": round(stage_wall, 1),
                        "optimizer_steps": round(step_seconds, 1),
                        "startup_tokenize_export": round(stage_wall - step_seconds, 1)},
        "plain_step_seconds": round(plain["step_seconds"], 1),
        "peak_rss_gib": {"ours_per_worker_max": metrics[-1]["peak_rss_gib_max_worker"],
                         "plain_process": round(plain["peak_rss_gib"], 3)},
        "loss_first_last": [round(metrics[0]["loss"], 3), round(metrics[-1]["loss"], 3)],
    }, indent=2))


if __name__ == "__main__":
    main()
