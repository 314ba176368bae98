"""Experiment tracking through the loop's own hook, read back from TensorBoard's event files and MLflow's
file store."""
import json
import struct

import pytest

from scoder_ray.config import ConfigError, load_config
from scoder_ray.store import RunStore, write_text


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under `folder` (length, crc, Event proto, crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def staged_run(tmp_path, backends: str):
    """A run whose stages are simple functions committing what real stages report (a training stage with
    its per-step metrics.jsonl), and a config asking for `backends`."""
    cfg = load_config("tiny", [f"run.root={tmp_path}", "run.id=r", f"tracking.backends=[{backends}]"])
    store = RunStore.for_config(cfg)

    def sample(c, s, force):
        return s.run_stage("iter_01/sample", {}, {}, lambda tmp: {"rows": 40, "parse_rate": 0.5, "tokens": 800,
                                                                  "generated": 40})

    def train(c, s, force):
        def produce(tmp):
            write_text(f"{tmp}/metrics.jsonl", "".join(json.dumps({"step": i, "loss": 4.0 / i, "lr": 1e-3,
                                                                   "tokens_per_s": 100.0 * i,
                                                                   **({"eval_loss": 5.0 / i} if i % 2 == 0 else {})})
                                                       + "\n" for i in range(1, 5)))
            return {"rows": 12, "total_steps": 4}
        return s.run_stage("iter_01/train", {}, {}, produce)

    return cfg, store, {"iter_01/sample": sample, "iter_01/train": train}


@pytest.mark.slow  # the loop's hook records Ray metrics too: a local Ray
def test_stage_counts_and_training_steps_reach_tensorboard_and_mlflow(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from scoder_ray.loop import _run

    cfg, store, stages = staged_run(tmp_path, "tensorboard,mlflow")
    _run(cfg, store, False, stages, None)
    tracking = tmp_path / "r" / "tracking"
    tb = tensorboard_scalars(tracking / "tensorboard")
    assert tb["iter_01/sample/rows"] == [(0, 40.0)] and tb["iter_01/sample/parse_rate"] == [(0, 0.5)]
    assert [s for s, _ in tb["iter_01/train/train/loss"]] == [1, 2, 3, 4]
    assert tb["iter_01/train/train/loss"][-1][1] == pytest.approx(1.0)
    assert tb["iter_01/train/train/eval_loss"] == [(2, 2.5), (4, 1.25)]  # held-out loss at the steps that had one
    client = MlflowClient(tracking_uri=f"file:{tracking}/mlruns")
    exp = client.get_experiment_by_name("scoder-ray")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.scoder_run = 'r'")
    assert len(runs) == 1 and runs[0].info.run_name == "r"
    history = client.get_metric_history(runs[0].info.run_id, "iter_01/train/train/loss")
    assert [(m.step, m.value) for m in history] == [(i, 4.0 / i) for i in range(1, 5)]
    assert runs[0].data.metrics["iter_01/sample/kept_fraction"] == 1.0  # 40 rows of 40 generated

    # A resumed driver: the finished stages are found done, logged once; MLflow's run is found again.
    _run(cfg, store, False, stages, None)
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.scoder_run = 'r'")) == 1
    assert len(tensorboard_scalars(tracking / "tensorboard")["iter_01/sample/rows"]) == 1


def test_tracking_is_off_by_default_and_names_a_bad_backend():
    assert load_config("tiny").tracking.backends == []
    with pytest.raises(ConfigError, match=r"tracking.backends: .*tensorboard, mlflow, wandb"):
        load_config("tiny", ["tracking.backends=[comet]"])


def test_stage_numbers_take_counts_only():
    """A stage summary's key in another shape than a count (a dict per model) is left out of the dashboard's
    gauges and the trackers' metrics, never an error at the end of a finished run."""
    from scoder_ray.metrics import rows_in, stage_rates
    from scoder_ray.tracking import stage_numbers

    assert rows_in({"rows": 6, "generated": 12}) == 12 and stage_rates({"rows": 6, "generated": 12}) == {"kept_fraction": 0.5}
    odd = {"rows": 24, "generated": {"base": 10, "scoder": 10}, "seconds": 3.0}
    assert rows_in(odd) is None and stage_rates(odd) == {} and stage_numbers(odd) == {"rows": 24.0, "seconds": 3.0}
