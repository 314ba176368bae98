"""Sampling throughput: our Ray Data + vLLM-actor stage against a bare `vllm.LLM.generate`.

    .venv/bin/python bench/generation.py [--model demo|tiny] [--seeds 32] [--n 4] [--max-tokens 128]

Same model, prompts and per-row sampling parameters (seeded), one run. Engine start-up is measured on
the bare engine and reported apart; our tokens/s is given both over the whole stage wall time and with
one engine start subtracted (the comparable figure). Goal: >= 0.8 of the bare engine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from scoder_ray import prompts
    from scoder_ray.config import load_config
    from scoder_ray.generate.engine import make_llm, shutdown_llm
    from scoder_ray.generate.sample import expand, run_sample, sampling_params
    from scoder_ray.ray_env import init_ray
    from scoder_ray.seeds import run_seeds, seeds_uri
    from scoder_ray.store import RunStore
    from scoder_ray.tiny import resolve_model

    tmp = tempfile.mkdtemp(prefix="bench-gen-")
    # Every seed on both sides (the demo preset samples a subset of seeds per iteration).
    cfg = load_config(args.model, [f"run.root={tmp}", "run.id=bench", f"seeds.max_snippets={args.seeds}",
                                   "sample.num_seeds=0", f"sample.samples_per_seed={args.n}",
                                   f"sample.max_tokens={args.max_tokens}",
                                   "ray.include_dashboard=false"])
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
    t = time.perf_counter()
    llm = make_llm(cfg.engine, model_path, cfg.run.seed)
    engine_start = time.perf_counter() - t
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template(prompts.chat(prompts.synthesizer_prompt(r["snippet"])), tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    params = sampling_params(cfg.sample, [r["sampling_seed"] for r in rows])  # the stage's own, guided decoding included
    llm.generate(texts[:4], params[:4], use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    bare_s = time.perf_counter() - t
    shutdown_llm(llm)
    bare_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    bare_tps = bare_tokens / bare_s
    ours_tps = done["tokens"] / ours_wall
    ours_tps_no_start = done["tokens"] / max(1e-6, ours_wall - engine_start)
    print(json.dumps({
        "model": args.model, "candidates": done["rows"], "cpus": os.cpu_count(), "engines": cfg.engine.num_engines,
        "engine_start_s": round(engine_start, 1),
        "ours_stage_wall_s": round(ours_wall, 1), "ours_tokens": done["tokens"],
        "ours_tokens_per_s_wall": round(ours_tps, 1), "ours_tokens_per_s_minus_engine_start": round(ours_tps_no_start, 1),
        "bare_generate_s": round(bare_s, 1), "bare_tokens": bare_tokens, "bare_tokens_per_s": round(bare_tps, 1),
        "ratio_ours_over_bare": round(ours_tps_no_start / bare_tps, 3),
        "ratio_ours_over_bare_wall": round(ours_tps / bare_tps, 3),
        "identical_token_counts": bare_tokens == done["tokens"],
    }, indent=2))


if __name__ == "__main__":
    main()
