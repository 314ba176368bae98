"""Sampling throughput: our Ray Data + vLLM-actor stage against bare `vllm.LLM.generate`.

    .venv/bin/python bench/generation.py [--model demo|tiny] [--seeds 32] [--n 4] [--max-tokens 128] [--engines 1]
                                         [--batch-size B] [--blocks-in-flight K]

`--batch-size` (rows per engine call, the stage's `sample.batch_size`): small values give the many-blocks case,
where the engine keeps full only with several blocks in flight (`engine.blocks_in_flight`, `--blocks-in-flight`;
the bare baseline generates all rows in one call).

Same model, prompts and per-row sampling parameters (seeded, guided decoding as the stage), one run.
Engine start-up is measured on the bare engine and reported apart; our tokens/s is given both over the
whole stage wall time and with one engine start subtracted (the comparable figure: engines start in
parallel). Baselines: one bare engine in one process and, with --engines > 1, the strongest one: that
many bare engines in their own processes at once, each pinned to its own `engine.cpus_per_engine`
cores, each generating an equal share of the prompts (tokens/s from the first start of generation to
the last end). Goal: >= 0.8 of the bare engine(s).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time


def bare_generate(engine_conf, sample_conf, model_path: str, seed: int, rows: list[dict], cores: list[int] | None,
                  barrier=None) -> dict:
    """One bare `LLM.generate` over `rows` after one warm-up call (in this process, pinned to `cores`)."""
    from scoder_ray import prompts
    from scoder_ray.generate.engine import make_llm, shutdown_llm
    from scoder_ray.generate.sample import sampling_params

    if cores:
        os.sched_setaffinity(0, cores)
    t = time.perf_counter()
    llm = make_llm(engine_conf, model_path, seed)
    start_s = time.perf_counter() - t
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template(prompts.chat(prompts.synthesizer_prompt(r["snippet"])), tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    params = sampling_params(sample_conf, [r["sampling_seed"] for r in rows])  # the stage's own, guided decoding included
    llm.generate(texts[:4], params[:4], use_tqdm=False)  # warm-up
    if barrier is not None:
        barrier.wait()
    t0 = time.time()
    outs = llm.generate(texts, params, use_tqdm=False)
    t1 = time.time()
    shutdown_llm(llm)
    return {"start_s": start_s, "t0": t0, "t1": t1, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "cores": sorted(os.sched_getaffinity(0))}


def _bare_child(queue, *args) -> None:
    queue.put(bare_generate(*args))


def bare_engines_at_once(engine_conf, sample_conf, model_path: str, seed: int, rows: list[dict]) -> dict:
    """`engine.num_engines` bare engines in their own processes and cores, generating together."""
    n, per = engine_conf.num_engines, engine_conf.cpus_per_engine
    allowed = sorted(os.sched_getaffinity(0))
    if n * per > len(allowed):
        raise SystemExit(f"{n} engines x {per} cores need {n * per} cores; this machine lets us use {len(allowed)}")
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(n)
    procs = [ctx.Process(target=_bare_child, args=(queue, engine_conf, sample_conf, model_path, seed, rows[i::n],
                                                  allowed[i * per:(i + 1) * per], barrier)) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    tokens = sum(r["tokens"] for r in results)
    seconds = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return {"tokens": tokens, "s": seconds, "tokens_per_s": tokens / seconds, "cores": [r["cores"] for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=0, help="sample.batch_size (0: the preset's)")
    ap.add_argument("--blocks-in-flight", type=int, default=0, help="engine.blocks_in_flight (0: the preset's)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from scoder_ray.config import load_config
    from scoder_ray.generate.sample import expand, run_sample
    from scoder_ray.ray_env import init_ray
    from scoder_ray.seeds import run_seeds, seeds_uri
    from scoder_ray.store import RunStore
    from scoder_ray.tiny import resolve_model

    tmp = tempfile.mkdtemp(prefix="bench-gen-")
    # Every seed on both sides (the demo preset samples a subset of seeds per iteration).
    cfg = load_config(args.model, [f"run.root={tmp}", "run.id=bench", f"seeds.max_snippets={args.seeds}",
                                   "sample.num_seeds=0", f"sample.samples_per_seed={args.n}",
                                   f"sample.max_tokens={args.max_tokens}", f"engine.num_engines={args.engines}",
                                   "ray.include_dashboard=false"]
                     + ([f"sample.batch_size={args.batch_size}"] if args.batch_size else [])
                     + ([f"engine.blocks_in_flight={args.blocks_in_flight}"] if args.blocks_in_flight else []))
    model_path = resolve_model(cfg.models.synthesizer, cfg.models.cache_dir, cfg.models.tiny_seed)
    init_ray(cfg.ray)
    store = RunStore.for_config(cfg)
    run_seeds(cfg, store)
    t = time.perf_counter()
    done = run_sample(cfg, store, 1, checkpoints=[("ckpt_01", model_path)])
    ours_wall = time.perf_counter() - t
    ray.shutdown()

    seeds = pq.read_table(seeds_uri(store).replace("file://", "")).to_pylist()
    rows = [r for s in seeds for r in expand(s, 1, "ckpt_01", args.n, cfg.run.seed)]
    one = bare_generate(cfg.engine, cfg.sample, model_path, cfg.run.seed, rows, None)
    engine_start = one["start_s"]
    bare_tps = one["tokens"] / (one["t1"] - one["t0"])
    ours_tps = done["tokens"] / ours_wall
    ours_tps_no_start = done["tokens"] / max(1e-6, ours_wall - engine_start)
    report = {
        "model": args.model, "candidates": done["rows"], "cpus": len(os.sched_getaffinity(0)),
        "engines": cfg.engine.num_engines, "cpus_per_engine": cfg.engine.cpus_per_engine,
        "rows_per_call": cfg.sample.batch_size, "calls": -(-done["rows"] // cfg.sample.batch_size),
        "blocks_in_flight": cfg.engine.blocks_in_flight,
        "engine_start_s": round(engine_start, 1),
        "ours_stage_wall_s": round(ours_wall, 1), "ours_tokens": done["tokens"],
        "ours_tokens_per_s_wall": round(ours_tps, 1), "ours_tokens_per_s_minus_engine_start": round(ours_tps_no_start, 1),
        "bare_generate_s": round(one["t1"] - one["t0"], 1), "bare_tokens": one["tokens"],
        "bare_tokens_per_s": round(bare_tps, 1),
        "ratio_ours_over_bare": round(ours_tps_no_start / bare_tps, 3),
        "ratio_ours_over_bare_wall": round(ours_tps / bare_tps, 3),
        "identical_token_counts": one["tokens"] == done["tokens"],
    }
    if cfg.engine.num_engines > 1:
        many = bare_engines_at_once(cfg.engine, cfg.sample, model_path, cfg.run.seed, rows)
        report.update({
            "bare_engines_at_once_cores": many["cores"], "bare_engines_at_once_s": round(many["s"], 1),
            "bare_engines_at_once_tokens_per_s": round(many["tokens_per_s"], 1),
            "ratio_ours_over_bare_engines_at_once": round(ours_tps_no_start / many["tokens_per_s"], 3),
            "ratio_ours_over_bare_engines_at_once_wall": round(ours_tps / many["tokens_per_s"], 3),
            "identical_token_counts_at_once": many["tokens"] == done["tokens"],
        })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
