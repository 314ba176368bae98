"""Cluster configs validate against Ray's own autoscaler schema; presets are checked against them."""
from pathlib import Path

import pytest
import yaml

from scoder_ray.cluster import node_types
from scoder_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_autoscaler_configs_validate_against_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # raises jsonschema.ValidationError on any schema violation
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0  # a CPU head
    gpu_groups = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert {v["resources"]["GPU"] for v in gpu_groups.values()} == {8} and len(gpu_groups) >= 2
    assert all(v["min_workers"] == 0 for v in gpu_groups.values())  # scale from zero
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2  # token auth on head and workers
    assert "--dashboard-host=127.0.0.1" in start  # dashboard not exposed: reached through `ray dashboard`
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_schema_validation_catches_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    raw["available_node_types"]["worker.a100x8"]["max_workers"] = "four"
    with pytest.raises(ValidationError, match="not of type 'integer'"):
        validate_config(prepare_config(raw))


def test_kuberay_manifest_has_the_expected_groups_and_security():
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay.yaml").read_text()) if d]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"a100x8", "h100x8"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["replicas"] == 0
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + \
        [g["template"]["spec"]["containers"][0] for g in groups.values()] + \
        job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "scoder-ray-auth"
    assert job["spec"]["entrypoint"].startswith("python jobs/run_loop.py --preset paper-7b")
    assert [(t.name, t.gpus, t.max_nodes) for t in node_types(str(ROOT / "cluster" / "kuberay.yaml"))] == \
        [("head", 0, 1), ("a100x8", 8, 4), ("h100x8", 8, 4)]


@pytest.mark.parametrize("cluster", ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay.yaml"])
def test_paper_preset_fits_every_cluster(cluster):
    cfg = load_config("paper-7b", [f"ray.cluster_config={cluster}"])
    assert cfg.engine.gpus_per_engine <= 8 and cfg.train.scoder.num_workers * cfg.train.scoder.gpus_per_worker <= 64


@pytest.mark.parametrize("override, key", [
    (["engine.gpus_per_engine=16", "engine.tensor_parallel_size=16"], "engine.gpus_per_engine"),
    (["train.scoder.num_workers=128"], "train.scoder.gpus_per_worker"),
    (["influence.gpus_per_actor=9"], "influence.gpus_per_actor"),
])
def test_a_preset_asking_for_gpus_no_node_type_has_is_rejected_at_load(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: does not fit ray.cluster_config=cluster/aws.yaml"):
        load_config("paper-7b", override)


def test_a_missing_cluster_config_is_named():
    with pytest.raises(ConfigError, match="ray.cluster_config: 'cluster/nope.yaml' is not allowed"):
        load_config("paper-7b", ["ray.cluster_config=cluster/nope.yaml"])
