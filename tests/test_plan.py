"""`scoder-ray plan`: the volumes a config implies, turned into GPUs, starts, GPU-hours and wall time."""
import pytest
import yaml

from scoder_ray.cli import main
from scoder_ray.config import load_config
from scoder_ray.plan import THROUGHPUT, load_throughput, plan


def by_stage(cfg, tp):
    return {s.stage: s for s in plan(cfg, tp)}


def test_paper_7b_volumes_and_hours_follow_the_config_and_the_throughput_file():
    tp = load_throughput()
    cfg = load_config("paper-7b")
    stages = by_stage(cfg, tp)
    assert list(stages)[:3] == ["bootstrap", "train_synthesizer", "iter_01/sample"] and list(stages)[-1] == "evaluate"
    sample = stages["iter_01/sample"]
    # 20,000 seeds x M=3 checkpoints x N=4, 450 tokens each, one pool of 8 engines per checkpoint, the three
    # side by side (24 GPUs at once, their start-ups overlapping)
    work_s = 20_000 * 3 * 4 * tp["sample_output_tokens"] / tp["generation_tokens_per_s"]
    wall_s = work_s / 24 + tp["engine_start_s"]
    assert (sample.gpus, sample.starts) == (24, 24)
    assert sample.wall_hours == pytest.approx(wall_s / 3600) and sample.gpu_hours == pytest.approx(24 * wall_s / 3600)
    # one after another (ray.parallel_checkpoints=1): 8 GPUs, three start-ups in a row
    serial = by_stage(load_config("paper-7b", ["ray.parallel_checkpoints=1"]), tp)["iter_01/sample"]
    assert serial.gpus == 8 and serial.wall_hours == pytest.approx((work_s / 8 + 3 * tp["engine_start_s"]) / 3600)
    influence = stages["iter_01/influence"]
    assert influence.volume.startswith("82,000 examples")  # (20,000 selected + 500 teacher) x 4 checkpoints
    # retraining grows with the kept samples: teacher + 5% of the selected per iteration so far
    assert [stages[f"iter_0{t}/train"].volume.split()[0] for t in (1, 2, 3)] == ["1,500", "2,500", "3,500"]
    assert stages["bootstrap"].gpus == 0 and stages["bootstrap"].gpu_hours == 0
    # twice the engines: sampling's work wall time halves (start-ups stay)
    wide = by_stage(load_config("paper-7b", ["engine.num_engines=16"]), tp)["iter_01/sample"]
    assert wide.wall_hours == pytest.approx((work_s / 48 + tp["engine_start_s"]) / 3600)


def test_plan_command_prints_the_table_from_a_given_throughput_file(tmp_path, capsys):
    tp = yaml.safe_load(THROUGHPUT.read_text())
    tp["generation_tokens_per_s"] *= 2
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump(tp))
    assert main(["plan", "--preset", "paper-7b"]) == 0
    default = capsys.readouterr().out
    assert main(["plan", "--preset", "paper-7b", "--throughput", str(path)]) == 0
    faster = capsys.readouterr().out
    total = {name: float(out.splitlines()[-1].split()[3]) for name, out in (("default", default), ("faster", faster))}
    assert "iter_03/influence" in default and str(path) in faster and total["faster"] < total["default"]
    assert main(["plan", "--preset", "demo"]) == 0
    assert "cpu" in capsys.readouterr().out
