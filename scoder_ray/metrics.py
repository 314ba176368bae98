"""Loop progress and counters for the Ray dashboard, through `ray.util.metrics` (exported by each
node's metrics agent on its Prometheus endpoint, which the dashboard's Metrics view and Grafana read).

Every series is tagged with the run id and the stage name: `scoder_ray_stage_rows_out{run=..,stage=..}`.
"""
from __future__ import annotations

from typing import Any


def rows_in(done: dict[str, Any]) -> Any:
    """The rows a stage read (candidates, generated samples, training rows), None when it does not say (or says it
    in another shape than a count: metrics never end a run)."""
    value = done.get("candidates", done.get("candidates_in", done.get("generated", done.get("input_rows"))))
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_rates(done: dict[str, Any]) -> dict[str, float]:
    """A stage's kept fraction (rows out / rows in) and tokens per second, where its _DONE.json has them."""
    out, read = {}, rows_in(done)
    if read:
        out["kept_fraction"] = float(done.get("rows", 0)) / float(read)
    if done.get("tokens") and done.get("seconds"):
        out["tokens_per_s"] = float(done["tokens"]) / max(1e-9, float(done["seconds"]))
    return out


class LoopMetrics:
    def __init__(self, run_id: str, total_stages: int):
        from ray.util.metrics import Counter, Gauge

        tags = ("run", "stage")
        self.run_id, self.total = run_id, total_stages
        self.done = Counter("scoder_ray_stages_done", "stages finished (or found done) by the driver", tag_keys=tags)
        self.rows_out = Gauge("scoder_ray_stage_rows_out", "rows a stage wrote", tag_keys=tags)
        self.rows_in = Gauge("scoder_ray_stage_rows_in", "rows a stage read (candidates, generated samples)", tag_keys=tags)
        self.parse_failures = Gauge("scoder_ray_stage_parse_failures", "completions that did not parse", tag_keys=tags)
        self.tokens_per_s = Gauge("scoder_ray_stage_tokens_per_s", "generated or trained tokens per second", tag_keys=tags)
        self.kept_fraction = Gauge("scoder_ray_stage_kept_fraction", "rows out / rows in of a filter", tag_keys=tags)
        self.seconds = Gauge("scoder_ray_stage_seconds", "wall time of a stage", tag_keys=tags)
        self.progress = Gauge("scoder_ray_loop_progress", "fraction of the loop's stages done", tag_keys=("run",))

    def record(self, stage: str, done: dict[str, Any], index: int) -> None:
        tags = {"run": self.run_id, "stage": stage}
        self.done.inc(1, tags)
        self.rows_out.set(float(done.get("rows", 0)), tags)
        self.seconds.set(float(done.get("seconds", 0.0)), tags)
        if rows_in(done) is not None:
            self.rows_in.set(float(rows_in(done)), tags)
        rates = stage_rates(done)
        if "kept_fraction" in rates:
            self.kept_fraction.set(rates["kept_fraction"], tags)
        if "parse_rate" in done:
            total = done.get("generated", done.get("rows", 0))
            self.parse_failures.set(float(round(total * (1 - done["parse_rate"]))), tags)
        if "tokens_per_s" in rates:
            self.tokens_per_s.set(rates["tokens_per_s"], tags)
        self.progress.set((index + 1) / self.total, {"run": self.run_id})
