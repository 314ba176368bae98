"""Live progress of a data stage while it runs: the engine actors report each block they finish to one
small actor per stage, on the driver's node, which prints `[scoder-ray] STAGE: done/total UNIT (p%),
rate, ETA` (at most every 10 s, and at the end); the driver reads its count every 2 s and sets the
dashboard gauge `scoder_ray_stage_done_fraction{run, stage}` and the counter `scoder_ray_stage_rows_done`
(on the driver node's metrics endpoint, as the loop's own; cluster/grafana/ charts them).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional


class StageProgress:
    """The stage's count (one actor, told of each block by the engine actors) and its console line."""

    def __init__(self, run_id: str, stage: str, total: int, unit: str):
        self.stage, self.total, self.unit, self.done = stage, max(0, total), unit, 0
        self.started, self.printed = time.time(), 0.0

    def add(self, n: int) -> None:
        self.done += n
        shown = min(self.done, self.total)  # a restarted engine redoes its block: never past the total
        now = time.time()
        if now - self.printed < 10 and shown < self.total:
            return
        self.printed = now
        rate = shown / max(now - self.started, 1e-9)
        sys.stderr.write(f"[scoder-ray] {self.stage}: {shown}/{self.total} {self.unit} "
                         f"({100 * shown / max(self.total, 1):.0f}%), {rate:.1f}/s, {eta(self.total - shown, rate)}\n")
        sys.stderr.flush()

    def counts(self) -> tuple[int, int]:
        """(rows done, never past the total; total)."""
        return min(self.done, self.total), self.total


class GaugeMirror:
    """Sets the dashboard's gauge and counter from the driver, reading the progress actor every `every_s`:
    the driver's metrics reach the head's endpoint on every scrape, where a short-lived actor's were missed
    (a whole two-node job's scrapes had none of them, measured in CI)."""

    _metrics: Optional[tuple[Any, Any]] = None  # one Gauge and Counter per process (Ray registers names once)

    def __init__(self, actor: Any, run_id: str, stage: str, every_s: float = 2.0):
        from ray.util.metrics import Counter, Gauge

        if GaugeMirror._metrics is None:
            GaugeMirror._metrics = (
                Gauge("scoder_ray_stage_done_fraction", "fraction of a running stage's rows done", tag_keys=("run", "stage")),
                Counter("scoder_ray_stage_rows_done", "rows a running stage has finished (rows/s: its rate)",
                        tag_keys=("run", "stage")))
        self.gauge, self.rows = GaugeMirror._metrics
        self.actor, self.tags, self.every_s, self.counted = actor, {"run": run_id, "stage": stage}, every_s, 0
        self.gauge.set(0.0, self.tags)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"progress-{stage}", daemon=True)
        self.thread.start()

    def update(self) -> None:
        import ray

        done, total = ray.get(self.actor.counts.remote(), timeout=30)
        if done > self.counted:
            self.rows.inc(done - self.counted, self.tags)
            self.counted = done
        self.gauge.set(done / total if total else 1.0, self.tags)

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - the actor is gone (the stage failed): nothing left to show
                return


_mirrors: dict[Any, GaugeMirror] = {}


def eta(left: float, rate: float) -> str:
    """`ETA 1m05s` for `left` units at `rate` per second (training steps use it too)."""
    seconds = left / rate if rate else 0.0
    return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


def start(run_id: str, stage: str, total: int, unit: str = "rows") -> Any:
    """A progress actor for one stage on this (the driver's) node; pass it to the engine actors."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(StageProgress).options(num_cpus=0, scheduling_strategy=here).remote(run_id, stage, total, unit)
    _mirrors[actor] = GaugeMirror(actor, run_id, stage)
    return actor


def tick(progress: Optional[Any], n: int) -> None:
    """Report n more rows done (no-op without a progress actor); does not wait."""
    if progress is not None:
        progress.add.remote(n)


def stop(progress: Optional[Any]) -> None:
    """Let the last report through, then end the actor."""
    import ray

    if progress is not None:
        mirror = _mirrors.pop(progress)  # made by `start`, in this process
        mirror.done.set()
        mirror.thread.join(timeout=35)
        mirror.update()  # the last count
        ray.kill(progress)
