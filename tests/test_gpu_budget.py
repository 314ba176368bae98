"""Stages hold the GPUs they may have: on a Ray instance that declares 8 logical GPUs (Ray's accounting only:
the engines and feature actors run on the CPU, and say so), a sampling stage with M=3 checkpoints and the
feature pools of 2 checkpoints x (candidates, references) run side by side and hold all 8 at once, as the
cluster's own resource view shows while they run (`ray_env.GpuWatch`); and the scorer's engines, where they
leave room, are kept from one iteration's scoring to the next, their GPUs off the others' budget.

Its own driver process: the suite's `ray_local` declares no GPUs, and one process has one Ray."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def failure_lines(output: str) -> str:
    """The lines that say why, wherever they are in the log of four engines (a tail held only noise)."""
    keep = [ln for ln in output.splitlines() if re.search(r"Error|Exception|failed|died|Killed|memory", ln)]
    return "\n".join(keep[-60:]) + "\n...\n" + output[-2000:]


def overlapping(pools: dict[str, list[float]]) -> bool:
    """Every pool's lifetime overlaps every other's: they ran side by side."""
    return max(w[0] for w in pools.values()) < min(w[1] for w in pools.values())


def test_sampling_and_feature_pools_hold_the_whole_gpu_budget(tmp_path, tiny_model_dir, lora_run, train_rows):
    base, ckpts = lora_run
    out = tmp_path / "out.json"
    args = {"root": str(tmp_path / "runs"), "tiny": tiny_model_dir, "base": base, "ckpts": ckpts,
            "rows": train_rows, "out": str(out)}
    proc = subprocess.run([sys.executable, __file__, json.dumps(args)], capture_output=True, text=True, timeout=840,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, failure_lines(proc.stdout + proc.stderr)
    got = json.loads(out.read_text())
    sample = got["sample"]
    # 2-GPU engines under a budget of 8: four engines, over the three checkpoints' pools, all at once
    assert sorted(w[2] for w in sample["pools"].values()) == [1, 1, 2], sample["pools"]
    assert overlapping(sample["pools"]) and sample["gpus"]["total"] == 8 and sample["gpus"]["peak"] == 8, sample
    assert sample["rows"] == 4 * 2 * 3 and set(sample["checkpoints"]) == {"c1", "c2", "c3"}
    features = got["features"]
    # 2-GPU actors: one per (checkpoint, kind) pool, the four pools at once (fewer actors to start: CI time)
    assert sorted(w[2] for w in features["pools"].values()) == [1, 1, 1, 1], features["pools"]
    assert overlapping(features["pools"]) and features["gpus"]["peak"] == 8, features
    assert got["feature_rows"] == {name: 16 for name in features["pools"]}
    assert "no CUDA device is visible here" in proc.stdout + proc.stderr  # the engines said they ran on the CPU
    # The scorer: a 2-GPU engine (one block) leaves 6 of 8, more than the stages before the next scoring
    # need (a 2-GPU feature actor, a 2-GPU sampling engine): kept, its GPUs off the budget, then reused.
    first, second = got["score"]
    assert first["scorer_engines"] == {"engines": 1, "reused": False, "kept": True, "why_not_kept": ""}, first
    assert got["while_kept"] == {"budget": 6, "gpus_free": 6.0}
    assert second["scorer_engines"] == {"engines": 1, "reused": True, "kept": False,
                                        "why_not_kept": "no later iteration scores"}, second
    assert first["engine_start_s"] > 0 and second["engine_start_s"] == 0  # no engine started for iteration 2
    assert got["after"] == {"budget": 8, "gpus_free": 8.0}  # ended with the last scoring
    assert got["same_scores"] and first["rows"] == second["rows"] == 12  # the kept engines score as fresh ones


def drive(args: dict) -> None:
    """The driver: its own local Ray with 8 logical GPUs and 8 logical CPUs, a seed pool of 4, then the two
    side-by-side stages as the loop runs them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from scoder_ray.config import load_config
    from scoder_ray.generate.sample import run_sample
    from scoder_ray.influence.stage import compute_features, feature_pools
    from scoder_ray.ray_env import init_ray, side_by_side
    from scoder_ray.store import RunStore, write_table

    cfg = load_config("tiny", [f"run.root={args['root']}", "run.id=gpus", "ray.num_cpus=8", "ray.num_gpus=8",
                               "ray.gpu_budget=8", "engine.gpus_per_engine=2", "sample.samples_per_seed=2",
                               "sample.max_tokens=8", "sample.batch_size=2", "sample.num_seeds=0",
                               "influence.gpus_per_actor=2", "influence.sort_window=8", "influence.max_len=128"])
    init_ray(cfg.ray)
    store = RunStore.for_config(cfg)
    rows = pq.read_table(args["rows"]).to_pylist()[:16]

    def seed_pool(tmp: str) -> dict:  # where run_sample reads it (seeds.seeds_uri)
        seeds = [{"seed_id": f"s{i}", "snippet": r["snippet"], "lang": "python"} for i, r in enumerate(rows[:4])]
        write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(seeds))
        return {"rows": len(seeds)}

    store.run_stage("seeds", {}, {}, seed_pool)
    sample = run_sample(cfg, store, 1, checkpoints=[(c, args["tiny"]) for c in ("c1", "c2", "c3")])

    # Features of 16 rows per (checkpoint, kind), in blocks of 8, on one 2-GPU actor per pool.
    src = Path(args["root"]) / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "cand_id": f"r{i}"} for i, r in enumerate(rows)]), src)
    counts: dict[str, int] = {}
    jobs = {f"{Path(d).name}-{kind}": (lambda actors, d=d, kind=kind: counts.__setitem__(
        f"{Path(d).name}-{kind}", compute_features(str(src), f"{args['root']}/feat/{Path(d).name}-{kind}", args["base"], d,
                                                   Path(d).name, kind, cfg.influence, cfg.run.seed, cfg.models,
                                                   actors=actors)["rows"]))
            for d in args["ckpts"] for kind in ("candidate", "reference")}
    features = side_by_side(jobs, feature_pools(cfg, len(jobs)), cfg.influence.gpus_per_actor)

    # Two iterations' scoring of the same 12 candidates, in one block (one engine).
    from test_score import CANDIDATES

    from scoder_ray.ray_env import gpu_budget
    from scoder_ray.score.stage import run_score

    scoring = load_config("tiny", [f"run.root={args['root']}", "run.id=gpus", "ray.num_cpus=8", "ray.num_gpus=8",
                                   "ray.gpu_budget=8", "engine.gpus_per_engine=2", "influence.gpus_per_actor=1",
                                   "sample.batch_size=12", "loop.iterations=2", "score.exec_timeout_s=2"])
    cands = [{"cand_id": f"c{s}{i}", "seed_id": f"s{s}", "iteration": 1, "ckpt": "c1", "sample_idx": i,
              "snippet": "def f(x):\n    return x\n", "problem": p, "solution": sol, "raw": "", "parse_ok": True,
              "reason": "", "tokens": 10, "truncated": False} for s in range(3) for i, (p, sol) in enumerate(CANDIDATES)]

    def free(settle_at: float = 0) -> dict:  # an ended actor's GPUs come back a moment after it exits
        for _ in range(40):
            gpus = ray.available_resources().get("GPU", 0.0)
            if gpus >= settle_at:
                break
            time.sleep(0.5)
        return {"budget": gpu_budget(scoring), "gpus_free": gpus}

    scores, seen = [], {}
    for t in (1, 2):
        def candidates(tmp: str) -> dict:
            write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(cands))
            return {"rows": len(cands), "parse_rate": 1.0}

        store.run_stage(f"iter_{t:02d}/sample", {}, {}, candidates)
        scores.append(run_score(scoring, store, t))
        table = pq.read_table(Path(store.path(f"iter_{t:02d}/score")) / "data").to_pandas().sort_values("cand_id")
        seen[t] = table.filter(like="aspect_").to_numpy().tolist()
        if t == 1:
            while_kept = free()
    Path(args["out"]).write_text(json.dumps({"sample": sample, "features": features, "feature_rows": counts,
                                             "score": scores, "while_kept": while_kept, "after": free(settle_at=8),
                                             "same_scores": seen[1] == seen[2]}))
    ray.shutdown()


if __name__ == "__main__":
    drive(json.loads(sys.argv[1]))
