"""Scoring throughput: the scoring stage (vLLM scorer actor + sandbox tasks) against a bare
`vllm.LLM.generate` with the same prompts and the same constrained-JSON regex, one run.

    .venv/bin/python bench/score.py [--model tiny|demo] [--candidates 64]

Candidates are stdlib functions posed as (problem, solution) pairs. Prints candidates/s of each (ours
over the stage wall time, and with one engine start subtracted), the ratio, and the sandbox's share:
the time the execution check alone takes on the same candidates, over the stage's time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--candidates", type=int, default=64)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from scoder_ray import prompts
    from scoder_ray.config import load_config
    from scoder_ray.seeds import documented_functions
    from scoder_ray.generate.engine import make_llm, shutdown_llm
    from scoder_ray.ray_env import init_ray
    from scoder_ray.score.aspects import aspect_regex, scorer_prompt
    from scoder_ray.score.execution import execute_batch
    from scoder_ray.score.stage import run_score
    from scoder_ray.store import RunStore
    from scoder_ray.tiny import resolve_model

    tmp = tempfile.mkdtemp(prefix="bench-score-")
    cfg = load_config(args.model, [f"run.root={tmp}", "run.id=bench", "ray.include_dashboard=false"])
    store = RunStore.for_config(cfg)
    rows = [{"cand_id": f"c{i:04d}", "seed_id": f"s{i}", "iteration": 1, "ckpt": "ckpt_01", "sample_idx": 0,
             "snippet": r["snippet"], "problem": r["problem"], "solution": r["solution"], "raw": "", "parse_ok": True,
             "reason": "", "tokens": 0, "truncated": False} for i, r in enumerate(documented_functions(args.candidates))]

    def write(out):
        Path(out, "data").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), f"{out}/data/part-0.parquet")
        return {"rows": len(rows)}

    store.run_stage("iter_01/sample", {}, {}, write)
    init_ray(cfg.ray)
    t = time.perf_counter()
    run_score(cfg, store, 1)
    stage_s = time.perf_counter() - t
    ray.shutdown()

    batch = {"problem": np.array([r["problem"] for r in rows], dtype=object),
             "solution": np.array([r["solution"] for r in rows], dtype=object)}
    t = time.perf_counter()
    execute_batch(batch, cfg.score.exec_timeout_s, cfg.score.exec_workers)
    sandbox_s = time.perf_counter() - t

    model_path = resolve_model(cfg.models.scorer, cfg.models.cache_dir, cfg.models.tiny_seed)
    t = time.perf_counter()
    llm = make_llm(cfg.engine, model_path, cfg.run.seed)
    start_s = time.perf_counter() - t
    tok = llm.get_tokenizer()
    aspects = list(cfg.score.aspects)
    texts = [tok.apply_chat_template(prompts.chat(scorer_prompt(aspects, r["snippet"], r["problem"], r["solution"])),
                                     tokenize=False, add_generation_prompt=True) for r in rows]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.score.max_tokens,
                            structured_outputs=StructuredOutputsParams(regex=aspect_regex(aspects)))
    llm.generate(texts[:2], params, use_tqdm=False)
    t = time.perf_counter()
    llm.generate(texts, params, use_tqdm=False)
    bare_s = time.perf_counter() - t
    shutdown_llm(llm)
    ours_cps = len(rows) / max(1e-6, stage_s - start_s)
    print(json.dumps({
        "model": args.model, "candidates": len(rows), "engine_start_s": round(start_s, 1),
        "stage_s": round(stage_s, 1), "ours_candidates_per_s_minus_engine_start": round(ours_cps, 2),
        "ours_candidates_per_s_wall": round(len(rows) / stage_s, 2),
        "bare_candidates_per_s": round(len(rows) / bare_s, 2), "ratio_ours_over_bare": round(ours_cps * bare_s / len(rows), 3),
        "sandbox_s": round(sandbox_s, 2), "sandbox_share_of_stage": round(sandbox_s / stage_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
