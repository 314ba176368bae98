"""Live progress of a data stage while it runs: the engine actors report each block they finish to one
small actor per stage, on the driver's node, which prints `[scoder-ray] STAGE: done/total UNIT (p%),
rate, ETA` (at most every 10 s, and at the end) and sets the dashboard gauge
`scoder_ray_stage_done_fraction{run, stage}` and the counter `scoder_ray_stage_rows_done` (on the driver
node's metrics endpoint, as the loop's own; cluster/grafana/ charts them).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional


class StageProgress:
    def __init__(self, run_id: str, stage: str, total: int, unit: str):
        from ray.util.metrics import Counter, Gauge

        self.stage, self.total, self.unit, self.done = stage, max(0, total), unit, 0
        self.started, self.printed = time.time(), 0.0
        self.tags = {"run": run_id, "stage": stage}
        self.gauge = Gauge("scoder_ray_stage_done_fraction", "fraction of a running stage's rows done",
                           tag_keys=("run", "stage"))
        self.rows = Counter("scoder_ray_stage_rows_done", "rows a running stage has finished (rows/s: its rate)",
                            tag_keys=("run", "stage"))
        self.gauge.set(0.0, self.tags)

    def add(self, n: int) -> None:
        self.done += n
        self.rows.inc(n, self.tags)
        shown = min(self.done, self.total)  # a restarted engine redoes its block: never past the total
        self.gauge.set(shown / self.total if self.total else 1.0, self.tags)
        now = time.time()
        if now - self.printed < 10 and shown < self.total:
            return
        self.printed = now
        rate = shown / max(now - self.started, 1e-9)
        sys.stderr.write(f"[scoder-ray] {self.stage}: {shown}/{self.total} {self.unit} "
                         f"({100 * shown / max(self.total, 1):.0f}%), {rate:.1f}/s, {eta(self.total - shown, rate)}\n")
        sys.stderr.flush()

    def fraction(self) -> float:
        return min(self.done, self.total) / self.total if self.total else 1.0


def eta(left: float, rate: float) -> str:
    """`ETA 1m05s` for `left` units at `rate` per second (training steps use it too)."""
    seconds = left / rate if rate else 0.0
    return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


def start(run_id: str, stage: str, total: int, unit: str = "rows") -> Any:
    """A progress actor for one stage on this (the driver's) node; pass it to the engine actors."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(StageProgress).options(num_cpus=0, scheduling_strategy=here).remote(run_id, stage, total, unit)


def tick(progress: Optional[Any], n: int) -> None:
    """Report n more rows done (no-op without a progress actor); does not wait."""
    if progress is not None:
        progress.add.remote(n)


def stop(progress: Optional[Any]) -> None:
    """Let the last report through, then end the actor."""
    import ray

    if progress is not None:
        ray.get(progress.fraction.remote(), timeout=30)
        ray.kill(progress)
