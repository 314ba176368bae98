"""The driver: runs the stages in order, each through the run store, so a rerun resumes.

Ray does the heavy lifting inside stages; the driver only passes configs and reads `_DONE.json`s.
Later stages (bootstrap, train, sample, score, influence, select, evaluate) register here.
"""
from __future__ import annotations

from typing import Any, Callable

from scoder_ray.config import Config
from scoder_ray.generate.bootstrap import run_bootstrap
from scoder_ray.generate.sample import current_synthesizer, run_sample
from scoder_ray.influence.stage import run_influence, run_warmup
from scoder_ray.ray_env import init_ray
from scoder_ray.score.stage import run_rank, run_score
from scoder_ray.seeds import run_seeds
from scoder_ray.store import RunStore
from scoder_ray.train.stage import run_train

StageFn = Callable[[Config, RunStore, bool], dict[str, Any]]
# What `scoder-ray run` chains today. The driver over bootstrap -> T iterations -> final synthesis ->
# SCoder training -> evaluation (issue 8) comes next; until then the later stages run alone.
STAGES: dict[str, StageFn] = {"seeds": run_seeds}
# Stages runnable alone (`scoder-ray stage NAME`).
EXTRA_STAGES: dict[str, StageFn] = {
    "bootstrap": run_bootstrap,
    "train_synthesizer": lambda cfg, store, force: run_train(cfg, store, "train_synthesizer", force),
    "sample": lambda cfg, store, force: run_sample(cfg, store, 1, force=force),
    "score": lambda cfg, store, force: run_score(cfg, store, 1, force=force),
    "rank": lambda cfg, store, force: run_rank(cfg, store, 1, force=force),
    "warmup": lambda cfg, store, force: run_warmup(cfg, store, 1, current_synthesizer(store, 1), force=force),
    "influence": lambda cfg, store, force: run_influence(cfg, store, 1, current_synthesizer(store, 1), force=force),
    "train_scoder": lambda cfg, store, force: run_train(cfg, store, "train_scoder", force),
}


def run_stage(cfg: Config, name: str, force: bool = False) -> dict[str, Any]:
    stages = {**STAGES, **EXTRA_STAGES}
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(stages)}")
    store = RunStore.for_config(cfg)
    store.write_config(cfg)
    init_ray(cfg.ray)
    return stages[name](cfg, store, force)


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    """Every stage in order; finished stages with unchanged inputs are skipped."""
    results = {}
    for name in STAGES:
        done = run_stage(cfg, name)
        results[name] = done
        verb = "skipped (already done)" if done.get("skipped") else f"done in {done['seconds']:.1f}s"
        print(f"[scoder-ray] stage {name}: {verb}, {done['rows']} rows", flush=True)
    return results
