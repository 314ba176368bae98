"""Experiment tracking (`tracking.backends`: tensorboard, mlflow, wandb; off by default).

The driver logs as each stage ends in this run: the stage's counts (rows, seconds, parse rate, tokens/s,
kept fraction...) at the stage's position in the plan, and a training stage's per-step metrics (loss, lr,
tokens/s) from its metrics.jsonl, which rank 0 wrote wherever it ran. Logging from the driver keeps every
backend on one machine, whatever node trained. A stage found done (a resumed run) was logged when it ran.
One tracking run per scoder-ray run: MLflow finds it again by the tag `scoder_run`, W&B by its id.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from scoder_ray.config import Config
from scoder_ray.metrics import stage_rates
from scoder_ray.store import RunStore, StoreError, read_text

COUNTS = ("rows", "seconds", "parse_rate", "candidates", "generated", "input_rows", "total_steps", "engine_start_s",
          "estimated_cost_usd")
STEP_KEYS = ("loss", "lr", "tokens_per_s", "step_time_s", "padding", "eval_loss")


def stage_numbers(done: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stage's _DONE.json worth charting across runs."""
    out = {k: float(done[k]) for k in COUNTS if isinstance(done.get(k), (int, float)) and not isinstance(done[k], bool)}
    return {**out, **stage_rates(done)}


def training_steps(store: RunStore, stage: str) -> list[dict[str, Any]]:
    try:
        text = read_text(store.uri(stage) + "/metrics.jsonl")
    except (FileNotFoundError, OSError, StoreError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Tracker:
    def __init__(self, cfg: Config, store: RunStore):
        conf = cfg.tracking
        self.run_id, self.store, self.backends = cfg.run.id, store, list(conf.backends)
        self.dir = os.path.expanduser(conf.dir or (store.uri_of(f"{store.base}/tracking") if store.local else
                                                   f"~/.cache/scoder-ray/tracking/{cfg.run.id}"))
        self.tb = self.mlflow = self.wandb = None
        if "tensorboard" in self.backends:
            from tensorboardX import SummaryWriter

            # Its file name holds the second and the host: a driver resumed within the same second would
            # replace the last one's events. A suffix unique to this writer keeps both.
            self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard", self.run_id),
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        if "mlflow" in self.backends:
            self._open_mlflow(conf.mlflow_uri, conf.experiment)
        if "wandb" in self.backends:
            try:
                import wandb
            except ImportError:
                raise ValueError("tracking.backends has wandb, which is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=conf.experiment, name=self.run_id, id=self.run_id, resume="allow",
                                    mode=conf.wandb_mode, dir=self.dir, config={"scoder_run": self.run_id})

    def _open_mlflow(self, uri: str, experiment: str) -> None:
        if not uri:  # MLflow 3 keeps its file store only on request ("maintenance mode"): ours is local
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file:" + os.path.join(self.dir, "mlruns")
        from mlflow.tracking import MlflowClient

        self.mlflow = MlflowClient(tracking_uri=uri)
        exp = self.mlflow.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.mlflow.create_experiment(experiment)
        found = self.mlflow.search_runs([exp_id], filter_string=f"tags.scoder_run = '{self.run_id}'", max_results=1)
        self.mlflow_run = (found[0].info.run_id if found else
                           self.mlflow.create_run(exp_id, run_name=self.run_id, tags={"scoder_run": self.run_id}).info.run_id)

    def _log(self, key: str, value: float, step: int) -> None:
        if self.tb:
            self.tb.add_scalar(key, value, step)
        if self.mlflow:
            self.mlflow.log_metric(self.mlflow_run, key, value, step=step)
        if self.wandb:
            self.wandb.log({key: value, "step": step})

    def stage(self, index: int, name: str, done: dict[str, Any]) -> None:
        """Log a stage that finished in this driver (not one found done)."""
        if done.get("skipped"):
            return
        for key, value in stage_numbers(done).items():
            self._log(f"{name}/{key}", value, index)
        for m in training_steps(self.store, name) if "total_steps" in done else []:
            for key in STEP_KEYS:
                if isinstance(m.get(key), (int, float)):
                    self._log(f"{name}/train/{key}", float(m[key]), int(m["step"]))
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def open_tracker(cfg: Config, store: RunStore) -> Optional[Tracker]:
    return Tracker(cfg, store) if cfg.tracking.backends else None
