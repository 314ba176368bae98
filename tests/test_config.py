import os

import pytest

from scoder_ray.cli import main
from scoder_ray.config import Config, ConfigError, digest, load_config, presets


def test_defaults_load_and_match_the_schema():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.seeds.sources == ["stdlib"]
    assert cfg.train.synthesizer.zero_stage == 2 and cfg.train.warmup.lora.enabled


@pytest.mark.parametrize("preset", ["tiny", "tiny-loop", "demo", "paper-7b"])
def test_every_preset_validates(preset):
    assert preset in presets()
    cfg = load_config(preset)
    assert cfg.run.id == preset


def test_paper_preset_is_gpu_scale():
    cfg = load_config("paper-7b")
    assert cfg.models.synthesizer == "hf:Qwen/Qwen2.5-Coder-7B-Instruct"
    assert cfg.models.scoder == "hf:deepseek-ai/deepseek-coder-6.7b-base"
    t = cfg.train.synthesizer
    assert (t.zero_stage, t.precision, cfg.engine.dtype) == (3, "bf16", "bfloat16")
    assert t.gpus_per_worker >= 1 and cfg.engine.gpus_per_engine >= 1
    assert cfg.loop.final_dataset_size == 60000


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["seeds.max_lines=33", "sample.temperature=0.5", "seeds.sources=[a,b]",
                               "run.id=x"])
    assert (cfg.seeds.max_lines, cfg.sample.temperature, cfg.run.id) == (33, 0.5, "x")
    assert cfg.seeds.sources == ["a", "b"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["seeds.nope=1"], "unknown config key 'seeds.nope'"),
        (["nope.x=1"], "unknown config key 'nope'"),
        (["seeds.max_lines=abc"], "seeds.max_lines"),
        (["train.synthesizer.epochs=-1"], "train.synthesizer.epochs: -1 is not allowed; expected an integer > 0"),
        (["train.warmup.lora.r=0"], "train.warmup.lora.r"),
        (["train.scoder.precision=bf16"], "train.scoder.precision"),
        (["train.synthesizer.data=/no/such/file.parquet"], "train.synthesizer.data"),
        (["loop.iterations=-2"], "loop.iterations"),
        (["train.synthesizer.zero_stage=1"], "train.synthesizer.zero_stage: 1 is not allowed; expected 2 or 3"),
        (["train.scoder.precision=fp8"], "train.scoder.precision"),
        (["seeds.near_dup_threshold=1.5"], "seeds.near_dup_threshold"),
        (["seeds.min_lines=50", "seeds.max_lines=10"], "seeds.max_lines"),
        (["models.synthesizer=/no/such/model"], "models.synthesizer: model path '/no/such/model' does not exist"),
        (["models.scorer=builtin:huge"], "models.scorer"),
        (["run.id=a/b"], "run.id"),
        (["run.root=ftp://host/runs"], "run.root: 'ftp://host/runs' is not allowed; expected a local path or s3://"),
        (["run.root=s3://b/runs", "run.shared=true"], "run.shared"),
        (["run.endpoint_url=minio:9000"], "run.endpoint_url: 'minio:9000' is not allowed; expected an http://"),
        (["run.lease_ttl_s=1"], "run.lease_ttl_s"),
        (["models.node_cache_gib=0"], "models.node_cache_gib"),
        (["models.synthesizer=ftp://x/model"], "models.synthesizer"),
        (["seeds.max_lines"], "not of the form key=value"),
        (["engine.cpus_per_engine=0"], "engine.cpus_per_engine: 0 is not allowed"),
        (["ray.num_cpus=2", "engine.cpus_per_engine=3"], "engine.cpus_per_engine: 3 is not allowed; expected <= ray.num_cpus (2)"),
        # accepted before, failing hours later (issue 18)
        (["sample.temperature=-3"], "sample.temperature: -3.0 is not allowed; expected a number in [0, 2.0]"),
        (["teacher.temperature=5"], "teacher.temperature: 5.0 is not allowed"),
        (["evaluate.timeout_s=-1"], "evaluate.timeout_s: -1.0 is not allowed"),
        (["train.warmup.lora.dropout=5"], "train.warmup.lora.dropout: 5.0 is not allowed; expected a probability"),
        (["loop.final_samples_per_seed=-4"], "loop.final_samples_per_seed: -4 is not allowed"),
        (["teacher.base_url=ftp://x"], "teacher.base_url: 'ftp://x' is not allowed; expected an http:// or https://"),
        (["teacher.samples_file=/no/such"], "teacher.samples_file: '/no/such' is not allowed; expected an existing"),
        (["evaluate.problems.humaneval=/no/where"], "evaluate.problems.humaneval: '/no/where' is not allowed"),
        (["evaluate.problems.nope=/no/where"], "evaluate.problems.nope: 'nope' is not allowed; expected a benchmark"),
        (["score.labels_file=/no/labels.jsonl"], "score.labels_file: '/no/labels.jsonl' is not allowed"),
        (["influence.gpus_per_actor=-1"], "influence.gpus_per_actor: -1"),
        (["prompts.synthesizer=with_exampels"], "prompts.synthesizer: 'with_exampels' is not allowed; expected a built-in "
                                                "(default, with_examples) or a template holding {snippet}"),
        (['prompts.synthesizer="Seed {snippet} in {language}: ### Problem, ### Solution"'],
         "prompts.synthesizer: 'Seed {snippet} in {language}: ### Problem, ### Solution' holds 'language' where only "
         "{snippet} and {lang} are filled in"),
        (['prompts.synthesizer="Write a problem about {snippet}."'], "does not ask for the layout the parser reads"),
        (['prompts.synthesizer="Write a problem. ### Problem ### Solution"'], "does not hold {snippet}"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert needle in str(e.value)


def test_unknown_key_error_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed under 'seeds': sources, languages, min_lines"):
        load_config(None, ["seeds.nope=1"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'nope' does not exist; available: demo, paper-7b, tiny, tiny-loop"):
        load_config("nope")


def test_local_model_path_needs_config_and_weights(tmp_path):
    with pytest.raises(ConfigError, match="models.scoder: .* expected a model folder with config.json and weights"):
        load_config("tiny", [f"models.scoder={tmp_path}"])  # an empty folder
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = load_config("tiny", [f"models.scoder={tmp_path}"])
    assert cfg.models.scoder == str(tmp_path)


def test_a_saved_run_config_loads_where_its_files_are_missing():
    """`scoder-ray status` on a laptop reads a run whose input files live on the cluster."""
    from scoder_ray.config import config_from_dict, to_dict

    data = to_dict(load_config("tiny"))
    data["teacher"]["samples_file"], data["models"]["scorer"] = "/cluster/only/samples.jsonl", "/cluster/only/model"
    assert config_from_dict(data).teacher.samples_file == "/cluster/only/samples.jsonl"
    data["sample"]["temperature"] = -1.0  # value rules still apply
    with pytest.raises(ConfigError, match="sample.temperature"):
        config_from_dict(data)


def test_digest_is_stable_and_sensitive():
    a, b = load_config("tiny"), load_config("tiny", ["seeds.max_lines=41"])
    assert digest(a.seeds) == digest(load_config("tiny").seeds)
    assert digest(a.seeds) != digest(b.seeds)
    assert digest(a.train) == digest(b.train)
    assert digest(a.train.synthesizer) != digest(load_config("tiny", ["train.synthesizer.lr=0.5"]).train.synthesizer)


def test_cli_reports_bad_config_before_any_work(capsys):
    assert main(["stage", "seeds", "--preset", "tiny", "train.synthesizer.epochs=-1"]) == 2
    assert "train.synthesizer.epochs: -1 is not allowed" in capsys.readouterr().err


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "tiny", "seeds.max_lines=42"]) == 0
    assert "max_lines: 42" in capsys.readouterr().out


def test_run_root_checks_before_any_work(monkeypatch):
    from scoder_ray.ray_env import apply_endpoint, check_run_root

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cfg = load_config("tiny", ["run.root=runs"])
    check_run_root(cfg, alive_nodes=1)  # one machine: a local root is fine
    with pytest.raises(ConfigError, match=r"run.root=runs: a local path, but this Ray cluster has 3 nodes.*run.shared=true"):
        check_run_root(cfg, alive_nodes=3)
    check_run_root(load_config("tiny", ["run.root=/mnt/nfs/runs", "run.shared=true"]), alive_nodes=3)
    check_run_root(load_config("tiny", ["run.root=s3://b/runs"]), alive_nodes=3)
    # inside `ray job submit` (Ray gives the driver its job config in this variable)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {}}, "metadata": {}}')
    with pytest.raises(ConfigError, match="relative path inside `ray job submit`"):
        check_run_root(cfg, alive_nodes=1)
    s3 = load_config("tiny", ["run.root=s3://b/runs", "run.endpoint_url=http://minio:9000"])
    with pytest.raises(ConfigError, match="run.endpoint_url=http://minio:9000: this job's workers would not see it"):
        apply_endpoint(s3)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       '{"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000"}}}')
    assert apply_endpoint(s3) == {"AWS_ENDPOINT_URL": "http://minio:9000"}
    assert os.environ["AWS_ENDPOINT_URL"] == "http://minio:9000"  # monkeypatch restores the variable after


def test_config_file_merges_after_the_preset_and_before_overrides(tmp_path, capsys):
    from scoder_ray.cli import main

    f = tmp_path / "mine.yaml"
    f.write_text("seeds:\n  max_lines: 42\n  min_lines: 3\n")
    cfg = load_config("tiny", ["seeds.min_lines=4"], config_file=str(f))
    assert (cfg.seeds.max_lines, cfg.seeds.min_lines) == (42, 4)
    with pytest.raises(ConfigError, match="--config '/no/such.yaml': no such file"):
        load_config("tiny", [], config_file="/no/such.yaml")
    (tmp_path / "bad.yaml").write_text("seeds: [\n")
    assert main(["config", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err
    assert main(["config", "--preset", "tiny", "--config", str(f)]) == 0
    assert "max_lines: 42" in capsys.readouterr().out


def test_version_and_demo_help(capsys):
    from scoder_ray import demo
    from scoder_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("scoder-ray ")
    assert demo.main(["--help"]) == 0 and "python -m scoder_ray.demo" in capsys.readouterr().out


def test_a_bare_hub_id_is_a_hub_model():
    cfg = load_config("tiny", ["models.synthesizer=Qwen/Qwen2.5-Coder-7B-Instruct"])
    assert cfg.models.synthesizer == "hf:Qwen/Qwen2.5-Coder-7B-Instruct"
    with pytest.raises(ConfigError, match="model path './nope/x' does not exist"):
        load_config("tiny", ["models.synthesizer=./nope/x"])  # a path, not an id


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    assert main(["stage", "seeds", "--preset", "tiny", "train.synthesizer.epochs=-1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.synthesizer.epochs"):
        main(["stage", "seeds", "--preset", "tiny", "--debug", "train.synthesizer.epochs=-1"])


def test_stage_iteration_is_checked_before_any_work(capsys, tmp_path):
    assert main(["stage", "sample", "--preset", "tiny", "--iteration", "5"]) == 2
    assert "--iteration 5: this run has iterations 1..2" in capsys.readouterr().err
    # a stage outside the iterations runs in a run of none (loop.iterations=0: the teacher's synthesizer only)
    assert main(["stage", "final", "--preset", "tiny", "loop.iterations=0", f"run.root={tmp_path}"]) == 2
    assert "final synthesis needs the seed pool" in capsys.readouterr().err
    assert main(["stage", "seeds", "--preset", "tiny", "--iteration", "2"]) == 2
    assert "--iteration applies to an iteration's stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown stage: each name once, as the usage line spells it
        main(["stage", "nosuch", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err and err.count("'train-data'") == 1 and "'train_data'" not in err


def test_a_wheel_install_carries_the_presets_and_cluster_configs(tmp_path):
    """Built as a wheel and installed away from the checkout, `scoder-ray` still finds its presets, defaults,
    throughput table and the cluster config paper-7b checks its GPU requests against."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for f in files:  # the tracked tree only: what a clone would build from
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((root / f).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("scoder_ray-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    code = ("import scoder_ray.config as c, scoder_ray.plan as p; assert '/site/' in c.__file__, c.__file__; "
            "print(c.presets()); cfg = c.load_config('paper-7b'); print(cfg.ray.cluster_config); "
            "print(p.load_throughput()['gpu'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['demo', 'paper-7b', 'tiny', 'tiny-loop']" in out.stdout and "cluster/aws.yaml" in out.stdout
