"""`scoder-ray plan`: the volumes a config implies, turned into GPUs, starts, GPU-hours and wall time."""
import os

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
    assert list(stages)[:4] == ["seeds", "bootstrap", "train_synthesizer", "iter_01/sample"]
    assert list(stages)[-1] == "evaluate"
    sample = stages["iter_01/sample"]
    # 20,000 seeds x M=3 checkpoints x N=4, 450 tokens each; the preset's cluster (cluster/aws.yaml) scales to 64
    # H100s, the default GPU budget: the three pools side by side share it (22 + 21 + 21 engines)
    work_s = 20_000 * 3 * 4 * tp["sample_output_tokens"] / tp["generation_tokens_per_s"]
    assert (sample.gpus, sample.starts) == (64, 64)
    assert sample.wall_hours == pytest.approx((work_s / 64 + tp["engine_start_s"]) / 3600)
    assert stages["iter_01/score"].gpus == 64 and stages["iter_01/influence"].gpus == 64
    assert stages["evaluate"].starts == 2  # 328 rows: one block, one engine per model (not 64 idle ones)
    # the + sets are their base sets' prompts: HumanEval and HumanEval+ are generated once (164 x 2 models)
    both = by_stage(load_config("paper-7b", ["evaluate.benchmarks=[humaneval,humaneval+,mbpp+]"]), tp)["evaluate"]
    assert both.volume.startswith(f"{(164 + 378) * 2:,}")
    # a budget of 24: three pools of 8, their start-ups overlapping
    b24 = by_stage(load_config("paper-7b", ["ray.gpu_budget=24"]), tp)["iter_01/sample"]
    assert (b24.gpus, b24.starts) == (24, 24)
    assert b24.wall_hours == pytest.approx((work_s / 24 + tp["engine_start_s"]) / 3600)
    assert b24.gpu_hours == pytest.approx(24 * (work_s / 24 + tp["engine_start_s"]) / 3600)
    # one after another (ray.parallel_checkpoints=1): each pool gets the whole budget, three start-ups in a row
    serial = by_stage(load_config("paper-7b", ["ray.gpu_budget=24", "ray.parallel_checkpoints=1"]), tp)["iter_01/sample"]
    assert (serial.gpus, serial.starts) == (24, 72)
    assert serial.wall_hours == pytest.approx((work_s / 24 + 3 * tp["engine_start_s"]) / 3600)
    # no cluster config, no budget: engine.num_engines per pool (8), twice as many engines halve the work's time
    free = ["ray.cluster_config=null", "ray.accelerator_type=''"]
    assert by_stage(load_config("paper-7b", free), tp)["iter_01/sample"].gpus == 24
    wide = by_stage(load_config("paper-7b", free + ["engine.num_engines=16"]), tp)["iter_01/sample"]
    assert wide.wall_hours == pytest.approx((work_s / 48 + tp["engine_start_s"]) / 3600)
    influence = stages["iter_01/influence"]
    assert influence.volume.startswith("82,000 examples")  # (20,000 selected + 500 teacher) x 4 checkpoints
    # retraining grows with the kept samples: teacher + 5% of the selected per iteration so far
    assert [stages[f"iter_0{t}/train"].volume.split()[0] for t in (1, 2, 3)] == ["1,500", "2,500", "3,500"]
    assert stages["bootstrap"].gpus == 0 and stages["bootstrap"].gpu_hours == 0
    # the SCoder model: 500 of the 60,000 rows held out (train.scoder.val_size), evaluated every 200 of its
    # 1,394 steps and at its export; without them the whole 60,000 train
    scoder = stages["train_scoder"]
    assert scoder.volume.startswith("59,500 rows x 3 epochs") and scoder.volume.endswith("500 held out x 7 evaluations")
    plain = by_stage(load_config("paper-7b", ["train.scoder.val_size=0"]), tp)["train_scoder"]
    assert plain.volume.startswith("60,000 rows") and "held out" not in plain.volume
    eval_s = 7 * 500 * tp["train_example_tokens"] / (3 * tp["train_tokens_per_s"])
    trained_s = 500 * 3 * tp["train_example_tokens"] / tp["train_tokens_per_s"]  # GPU-seconds (per-GPU throughput)
    assert scoder.gpu_hours == pytest.approx(plain.gpu_hours - (trained_s - eval_s) / 3600)


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
    # a file of only the numbers you measured: the others from conf/throughput.yaml; a misspelt key is named
    partial = tmp_path / "mine.yaml"
    partial.write_text(f"generation_tokens_per_s: {tp['generation_tokens_per_s']}\n")
    assert main(["plan", "--preset", "paper-7b", "--throughput", str(partial)]) == 0
    assert float(capsys.readouterr().out.splitlines()[-1].split()[3]) == total["faster"]
    partial.write_text("generation_token_per_s: 5000\n")
    assert main(["plan", "--preset", "paper-7b", "--throughput", str(partial)]) == 2
    assert "unknown throughput key(s) generation_token_per_s" in capsys.readouterr().err


def test_pools_side_by_side_share_the_gpu_budget():
    from scoder_ray.ray_env import pool_sizes

    assert pool_sizes(3, 1, 8, budget=8) == [3, 3, 2]  # M=3 pools hold all 8 GPUs at once
    assert pool_sizes(3, 2, 8, budget=8) == [2, 1, 1]  # 2-GPU engines: 4 of them
    assert pool_sizes(3, 4, 8, budget=8) == [1, 1]  # two 4-GPU engines: two pools at once, the third after
    assert pool_sizes(3, 1, 8, budget=8, at_most=1) == [8]  # one after another, each with the whole budget
    assert pool_sizes(3, 1, 8) == [8, 8, 8] and pool_sizes(3, 0, 2, budget=8) == [2, 2, 2]  # no budget; CPU pools
    assert pool_sizes(4, 1, 1, budget=64, at_most=2) == [32, 32]


def test_the_scorer_is_kept_between_iterations_only_where_it_leaves_room():
    from scoder_ray.generate.kept_engines import scorer_keep_reason

    tp = load_throughput()
    # paper-7b: the scorer's pool is the whole budget (64), the fastest scoring: started in every iteration
    full = by_stage(load_config("paper-7b"), tp)
    assert [full[f"iter_0{t}/score"].starts for t in (1, 2, 3)] == [64, 64, 64]
    # 8,192-row blocks: 24 engines for 192,000 candidates leave 40 GPUs: kept, and influence gets those 40
    few = by_stage(load_config("paper-7b", ["sample.batch_size=8192"]), tp)
    assert [few[f"iter_0{t}/score"].starts for t in (1, 2, 3)] == [24, 0, 0]
    assert few["iter_02/score"].wall_hours < few["iter_01/score"].wall_hours  # no start-up
    assert few["iter_01/influence"].gpus == 40 and full["iter_01/influence"].gpus == 64
    cfg = load_config("paper-7b")
    assert scorer_keep_reason(cfg, 1, 24, 64) == "" and "no later iteration" in scorer_keep_reason(cfg, 3, 24, 64)
    assert "need 8" in scorer_keep_reason(cfg, 1, 60, 64)  # 4 left, the training workers need 8
    assert "CPU engines" in scorer_keep_reason(load_config("tiny"), 1, 1, 0)
    assert "keep_scorer=false" in scorer_keep_reason(load_config("paper-7b", ["engine.keep_scorer=false"]), 1, 24, 64)


def test_the_cpu_stages_get_a_wall_time_from_the_seed_volume_and_the_teachers_latency(tmp_path):
    tp = load_throughput()
    stages = by_stage(load_config("paper-7b"), tp)
    # 300,000 starcoderdata files (the hf: source's limit=) on the 32 CPUs of cluster/aws.yaml's head
    seeds = stages["seeds"]
    snippets = 300_000 * tp["seeds_snippets_per_file"]
    want = (300_000 / tp["seeds_hub_records_per_s"] + 300_000 / (32 * tp["seeds_files_per_cpu_s"])
            + snippets / tp["seeds_driver_snippets_per_s"])
    assert seeds.gpus == 0 and seeds.gpu_hours == 0 and seeds.wall_hours == pytest.approx(want / 3600)
    assert seeds.volume.startswith("300,000 files") and seeds.volume.endswith("on 32 CPUs")
    assert list(stages)[:2] == ["seeds", "bootstrap"]
    # 500 requests, 32 at a time: 16 rounds of the teacher's latency; gpt-4o's list price
    boot = stages["bootstrap"]
    assert boot.wall_hours == pytest.approx(16 * tp["teacher_request_s"] / 3600) and boot.gpu_hours == 0
    usd = 500 * (tp["teacher_prompt_tokens"] * 2.50 + tp["teacher_output_tokens"] * 10.00) / 1e6
    assert f"~${usd:,.2f} at gpt-4o's price" in boot.volume
    # the KubeRay head's CPUs are its container's limit (28); supplied samples cost no teacher time
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"problem": "p", "solution": "s"}\n' * 3 + "\n")
    kube = by_stage(load_config("paper-7b", ["ray.cluster_config=cluster/kuberay.yaml", f"teacher.samples_file={mine}"]), tp)
    assert kube["seeds"].volume.endswith("on 28 CPUs") and kube["seeds"].wall_hours > seeds.wall_hours
    assert kube["bootstrap"].wall_hours == 0 and kube["bootstrap"].volume == "3 rows from teacher.samples_file"
    assert kube["train_synthesizer"].volume.startswith("3 rows x 3 epochs")  # every row of the file, not num_seeds
    # local sources are counted where they are; an hf: source without limit= has no size here
    code = tmp_path / "code"
    code.mkdir()
    for i in range(3):
        (code / f"m{i}.py").write_text("def f():\n    return 1\n")
    local = by_stage(load_config("tiny", [f"seeds.sources=[{code}]"]), tp)["seeds"]
    assert local.volume.startswith("3 files") and local.wall_hours > 0
    (code / "more.jsonl").write_text('{"snippet": "def g():\\n    return 2\\n"}\n' * 5)  # a snippet per row
    rows = by_stage(load_config("tiny", [f"seeds.sources=[{code}]"]), tp)["seeds"]
    assert rows.volume == f"3 files, 5 snippet rows, ~{3 * tp['seeds_snippets_per_file'] + 5:,.0f} snippets on {os.cpu_count()} CPUs"
    unknown = by_stage(load_config("tiny", ["seeds.sources=[hf:bigcode/starcoderdata?streaming=true]"]), tp)["seeds"]
    assert unknown.wall_hours == 0 and unknown.volume.startswith("unknown")
