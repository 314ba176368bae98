"""Engine actors the driver holds itself, deals blocks to, and may keep from one stage to the next that needs
the same model: the scorer is the same model in every iteration, so when its engines leave room for what the
stages between two scorings need, they start once per run instead of once per iteration
(`engine.keep_scorer`). While kept, their GPUs come off the budget the other stages share (ray_env.gpu_budget).

Why not keep them always: at scale the scorer's pool is the whole GPU budget (the fastest scoring), and holding
it through influence and training would leave those stages nothing. And not on CPU engines: a kept engine would
hold its pinned cores and its memory through training."""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

from scoder_ray.config import Config

_kept: dict[str, dict[str, Any]] = {}  # key -> {"actors": [...], "gpus": GPUs they hold}


def held_gpus() -> float:
    """GPUs the kept engines of this driver hold."""
    return sum(k["gpus"] for k in _kept.values())


def take(key: str) -> Optional[list]:
    """The engines kept under `key` (now the caller's: keep them again or release them), else None; engines
    kept under another key are released first (their GPUs are wanted)."""
    found = _kept.pop(key, None)
    release()
    return found["actors"] if found else None


def keep(key: str, actors: list, gpus: float) -> None:
    _kept[key] = {"actors": actors, "gpus": gpus}


def release(actors: Optional[list] = None, wait_s: float = 60.0) -> None:
    """End `actors` (default: every kept engine) gracefully, so each stops its vLLM engine at its exit, and
    wait until they are gone (their GPUs free)."""
    import ray

    if actors is None:
        actors = [a for k in _kept.values() for a in k["actors"]]
        _kept.clear()
    if not actors or not ray.is_initialized():
        return
    ray.wait([a.__ray_terminate__.remote() for a in actors], num_returns=len(actors), timeout=wait_s)


def deal(actors: list, blocks: list, method: str, in_flight: int, *args: Any,
         then: Optional[Callable[[int, Any], Any]] = None) -> list:
    """Call `method(block, *args)` on the actors for every block, `in_flight` blocks at a time on each actor,
    the next block to whichever actor finishes one first; returns the result refs in the blocks' order, or
    what `then(block index, result ref)` returned for each (called as the block is dealt: a task given the
    ref runs once the result exists). The method returns (result, rows): the small `rows` ref is read to
    surface a failed block at once."""
    import ray

    queue = deque(enumerate(blocks))
    results: list = [None] * len(blocks)
    busy = {i: 0 for i in range(len(actors))}
    pending: dict[Any, tuple[int, int]] = {}  # rows ref -> (block, actor)
    while queue or pending:
        for a in busy:
            while queue and busy[a] < in_flight:
                i, block = queue.popleft()
                result, rows = getattr(actors[a], method).options(num_returns=2).remote(block, *args)
                results[i] = then(i, result) if then else result
                pending[rows], busy[a] = (i, a), busy[a] + 1
        done, _ = ray.wait(list(pending), num_returns=1)
        ray.get(done[0])  # raises the block's error (an engine that could not start: its reason)
        busy[pending.pop(done[0])[1]] -= 1
    return results


def scorer_keep_reason(cfg: Config, iteration: int, engines: int, total_gpus: float) -> str:
    """Why the scorer's `engines` are not kept after iteration `iteration`'s scoring ('' to keep them): the
    GPUs they hold must leave, of `total_gpus`, what the stages up to the next scoring need at least (the
    warm-up's and the retraining's workers, one feature actor, one sampling engine)."""
    if not cfg.engine.keep_scorer:
        return "engine.keep_scorer=false"
    if iteration >= cfg.loop.iterations:
        return "no later iteration scores"
    g = cfg.engine.gpus_per_engine
    if not g:
        return "CPU engines (they would hold their cores and memory through training)"
    need = max(cfg.train.warmup.num_workers * cfg.train.warmup.gpus_per_worker,
               cfg.train.synthesizer.num_workers * cfg.train.synthesizer.gpus_per_worker,
               cfg.influence.gpus_per_actor, g)
    held = engines * g
    if total_gpus - held < need:
        return (f"its {held:g} GPUs would leave {total_gpus - held:g} of {total_gpus:g}, and the stages before the "
                f"next scoring need {need:g}")
    return ""
