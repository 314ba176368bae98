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


def test_local_model_path_that_exists_is_accepted(tmp_path):
    cfg = load_config("tiny", [f"models.scoder={tmp_path}"])
    assert cfg.models.scoder == str(tmp_path)


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
