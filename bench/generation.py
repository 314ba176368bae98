"""Sampling throughput: our Ray Data + vLLM-actor stage against bare `vllm.LLM.generate`.

    .venv/bin/python bench/generation.py [--model demo|tiny] [--seeds 32] [--n 4] [--max-tokens 128] [--engines 1]
                                         [--batch-size B] [--blocks-in-flight K]

`--batch-size` (rows per engine call, the stage's `sample.batch_size`): small values give the many-blocks case,
where the engine keeps full only with several blocks in flight (`engine.blocks_in_flight`, `--blocks-in-flight`;
the bare baseline generates all rows in one call).

Same model, prompts and per-row sampling parameters (seeded, guided decoding as the stage), one run.
Engine start-up is measured on the bare engine and reported apart; our tokens/s is given both over the
whole stage wall time, with one engine start subtracted (engines start in parallel), and over the
engine's generation span alone (first block's start to last block's end, timed in the actor: the stage's
fixed costs apart, which a small run is mostly made of). Baselines: one bare engine in one process and, with --engines > 1, the strongest one: that
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


def bare_in_child(*args) -> dict:
    """`bare_generate` in a process of its own, so that pinning it leaves this process's cores as they were."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bare_child, args=(queue, *args))
    proc.start()
    out = queue.get()
    proc.join()
    return out


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


def ray_data_llm(engine_conf, sample_conf, model_path: str, seed: int, rows: list[dict], blocks_in_flight: int) -> dict:
    """The same rows through Ray's own `ray.data.llm` vLLM processor (one engine actor, the same engine
    arguments, prompts, per-row seeds and batch size, `max_concurrent_batches` = our blocks in flight); the
    other way issue 19 names to keep an engine full. It starts and stops its own local Ray."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from scoder_ray import prompts
    from scoder_ray.generate.engine import engine_kwargs

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30)
    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [tok.apply_chat_template(prompts.chat(prompts.synthesizer_prompt(r["snippet"])), tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    kwargs = engine_kwargs(engine_conf, model_path, seed, gpu=False)
    kwargs.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs=kwargs, batch_size=sample_conf.batch_size, concurrency=1,
        max_concurrent_batches=blocks_in_flight, placement_group_config={"bundles": [{"CPU": 1}]},
        log_engine_metrics=False, chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    sp = {"temperature": sample_conf.temperature, "top_p": sample_conf.top_p, "max_tokens": sample_conf.max_tokens}
    processor = build_processor(
        config, preprocess=lambda r: {"prompt": r["text"], "sampling_params": {**sp, "seed": int(r["sampling_seed"])}},
        postprocess=lambda r: {"tokens": int(r["num_generated_tokens"])})
    ds = ray.data.from_items([{"text": t, "sampling_seed": r["sampling_seed"]} for t, r in zip(texts, rows)])
    t = time.perf_counter()
    tokens = int(processor(ds).to_pandas()["tokens"].sum())
    wall = time.perf_counter() - t
    ray.shutdown()
    return {"tokens": tokens, "wall_s": wall}


def timed_sampler() -> None:
    """Run the stage with `TimedSampler`: the stage's Sampler, and each block's start and end times as two more
    columns (bench only). The span from the first block's start to the last one's end is the engine's share of
    the stage, apart from Ray Data's fixed costs (materialising blocks, starting the actor process, writing,
    shutting the engine down). Taken from this file as a module (`generation`, on the workers' path as the
    driver's script folder), so the workers import it, and the stage's Sampler it extends, by name."""
    import generation

    from scoder_ray.generate import sample

    sample.Sampler = generation.TimedSampler


def _timed_sampler_class():
    import numpy as np

    from scoder_ray.generate.sample import Sampler

    class TimedSampler(Sampler):
        async def __call__(self, batch):
            t0 = time.time()
            out = await super().__call__(batch)
            n = len(out["cand_id"])
            out["gen_t0"], out["gen_t1"] = np.full(n, t0), np.full(n, time.time())
            return out

    return TimedSampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=0, help="sample.batch_size (0: the preset's)")
    ap.add_argument("--blocks-in-flight", type=int, default=0, help="engine.blocks_in_flight (0: the preset's)")
    ap.add_argument("--cpus-per-engine", type=int, default=0,
                    help="engine.cpus_per_engine, the cores our engine pins to (0: the preset's); the bare engine is "
                         "measured unpinned (every core) and pinned to as many cores")
    ap.add_argument("--ray-data-llm", action="store_true", help="also run the rows through ray.data.llm's processor")
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
                     + ([f"engine.blocks_in_flight={args.blocks_in_flight}"] if args.blocks_in_flight else [])
                     + ([f"engine.cpus_per_engine={args.cpus_per_engine}"] if args.cpus_per_engine else []))
    model_path = resolve_model(cfg.models.synthesizer, cfg.models.cache_dir, cfg.models.tiny_seed)
    init_ray(cfg.ray)
    store = RunStore.for_config(cfg)
    run_seeds(cfg, store)
    timed_sampler()
    t = time.perf_counter()
    done = run_sample(cfg, store, 1, checkpoints=[("ckpt_01", model_path)])
    ours_wall = time.perf_counter() - t
    ray.shutdown()
    times = pq.read_table(store.path("iter_01/sample") + "/data",
                          columns=["gen_t0", "gen_t1"]).to_pandas()
    span = float(times.gen_t1.max() - times.gen_t0.min())

    seeds = pq.read_table(seeds_uri(store).replace("file://", "")).to_pylist()
    rows = [r for s in seeds for r in expand(s, 1, "ckpt_01", args.n, cfg.run.seed)]
    one = bare_generate(cfg.engine, cfg.sample, model_path, cfg.run.seed, rows, None)
    # The same engine on the cores ours was given (engine.cpus_per_engine): equal resources.
    cores = sorted(os.sched_getaffinity(0))[:cfg.engine.cpus_per_engine]
    pinned = one if len(cores) == len(os.sched_getaffinity(0)) else bare_in_child(
        cfg.engine, cfg.sample, model_path, cfg.run.seed, rows, cores)
    pinned_tps = pinned["tokens"] / (pinned["t1"] - pinned["t0"])
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
        "ours_generation_span_s": round(span, 1),  # first block's start to last block's end, in the engine actor
        "ratio_generation_span_over_bare": round(done["tokens"] / span / bare_tps, 3),
        "bare_on_engine_cores": cores, "bare_on_engine_cores_tokens_per_s": round(pinned_tps, 1),
        "ratio_ours_over_bare_on_engine_cores": round(ours_tps_no_start / pinned_tps, 3),
        "ratio_generation_span_over_bare_on_engine_cores": round(done["tokens"] / span / pinned_tps, 3),
    }
    if args.ray_data_llm:
        theirs = ray_data_llm(cfg.engine, cfg.sample, model_path, cfg.run.seed, rows, cfg.engine.blocks_in_flight)
        theirs_tps = theirs["tokens"] / max(1e-6, theirs["wall_s"] - engine_start)
        report.update({"ray_data_llm_wall_s": round(theirs["wall_s"], 1), "ray_data_llm_tokens": theirs["tokens"],
                       "ray_data_llm_tokens_per_s_minus_engine_start": round(theirs_tps, 1),
                       "ratio_ours_over_ray_data_llm": round(ours_tps_no_start / theirs_tps, 3)})
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


if __name__ == "generation":  # imported by timed_sampler() in the driver, and by the engine workers
    TimedSampler = _timed_sampler_class()
    TimedSampler.__module__, TimedSampler.__qualname__ = __name__, "TimedSampler"

if __name__ == "__main__":
    main()
