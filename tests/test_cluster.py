"""Cluster configs: Ray's autoscaler schema and KubeRay's CRD schemas, plus what no schema checks (image vs
login user, one GPU model per pool, requests inside a node's allocatable, the project's interpreter
everywhere), and the GPU flavour's pins resolving."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scoder_ray.cluster import node_types
from scoder_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
VENV_RAY = "source ~/scoder-ray/.venv/bin/activate"


def prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text()))
    validate_config(config)  # raises jsonschema.ValidationError on any schema violation
    return config


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_autoscaler_configs_validate_against_rays_schema(name):
    config = prepared(name)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0  # a CPU head
    gpu_groups = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert {v["resources"]["GPU"] for v in gpu_groups.values()} == {8} and len(gpu_groups) >= 3
    assert all(v["min_workers"] == 0 for v in gpu_groups.values())  # scale from zero
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2  # token auth on head and workers
    assert "--dashboard-host=127.0.0.1" in start  # dashboard not exposed: reached through `ray dashboard`
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_autoscaler_configs_boot_the_project_stack_on_the_right_image(name):
    config = prepared(name)
    types = config["available_node_types"]
    # Ray runs everything on the venv's interpreter: every `ray` command inside the activated venv
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert cmd.startswith(VENV_RAY + " && ") and (" ray " in f" {cmd} " or "cluster/grafana/start-metrics.sh" in cmd), cmd
    # The dashboard's Metrics view: Prometheus and Grafana started on the head, their URLs known to the dashboard
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090" in head and "RAY_GRAFANA_HOST=http://127.0.0.1:3000" in head
    assert head.index("ray start --head") < head.index("cluster/grafana/start-metrics.sh")  # after Ray wrote its config
    # no Ray default sneaks in (its defaults pip-install a nightly Ray into the system Python)
    assert config["setup_commands"] == [] and not any("pip install" in c for c in config["head_setup_commands"])
    head_setup = " ".join(config["head_setup_commands"])
    assert "SCODER_RAY_FLAVOUR=gpu" in head_setup and "PYTHON=python3.11" in head_setup
    for key, t in types.items():
        if not t["resources"].get("GPU"):
            continue
        setup = t["worker_setup_commands"]
        # waits for the driver (GCP installs it at first boot), then fails with a message before installing
        assert setup[0].startswith('timeout 600 bash -c "until nvidia-smi -L;') and "exit 1" in setup[0], key
        assert "SCODER_RAY_FLAVOUR=gpu" in setup[-1], key
        accels = [r for r in t["resources"] if r.startswith("accelerator_type:")]
        assert len(accels) == 1 and t["resources"][accels[0]] == 1, key  # one GPU model per node type
    assert {".venv", "runs"} <= set(config["rsync_exclude"]) and config["rsync_filter"] == [".gitignore"]
    # image <-> login user <-> root device: Ubuntu images log in as `ubuntu`
    assert config["auth"]["ssh_user"] == "ubuntu"
    for key, t in types.items():
        nc = t["node_config"]
        if name == "aws":
            assert "ubuntu-22.04" in nc["ImageId"] and "nvidia-driver" in nc["ImageId"], key
            assert nc["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1", key  # Ubuntu AMIs' root device
        else:
            image = nc["disks"][0]["initializeParams"]["sourceImage"]
            assert "ubuntu-2204" in image and "deeplearning-platform-release" in image, key
            assert isinstance(nc.get("scheduling", {}), dict), key  # an object in the Compute API
    # a spot/preemptible group of the same GPU model as an on-demand one
    spot = [k for k, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or t["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"]
    assert spot and all(any(k2 != k and types[k2]["resources"] == types[k]["resources"] for k2 in types) for k in spot)


def test_schema_validation_catches_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    raw["available_node_types"]["worker.a100x8"]["max_workers"] = "four"
    with pytest.raises(ValidationError, match="not of type 'integer'"):
        validate_config(prepare_config(raw))


# -- KubeRay ------------------------------------------------------------------------------------------
KUBERAY = "v1.7.0"
# GKE's allocatable for the machine types the manifest selects: capacity less GKE's documented reservations
# (memory: 255 MiB + 25% of the first 4 GiB + 20% of the next 4 + 10% of the next 8 + 6% of the next 112 + 2%
# above 128, plus a 100 MiB eviction threshold; CPU: 6% of the first core, 1% of the next, 0.5% of the next
# 2, 0.25% above 4), less room for DaemonSets (GPU device plugin, logging): 1 CPU and 4 GiB.
MACHINES = {"n2-standard-32": (32, 128), "a2-highgpu-8g": (96, 680), "a3-highgpu-8g": (208, 1872)}


def gke_allocatable(cpus: int, mem_gib: float) -> tuple[float, float]:
    tiers = [(4, .25), (4, .20), (8, .10), (112, .06), (float("inf"), .02)]
    left, reserved = mem_gib, 0.25
    for size, share in tiers:
        reserved += share * min(left, size)
        left -= min(left, size)
    cpu_res = .06 + .01 * min(max(cpus - 1, 0), 1) + .005 * min(max(cpus - 2, 0), 2) + .0025 * max(cpus - 4, 0)
    return cpus - cpu_res - 1, mem_gib - reserved - 0.1 - 4


def quantity_gib(q: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    return next(float(q[:-2]) * f for u, f in units.items() if q.endswith(u))


def strict(schema):
    """The CRD schema with unknown fields refused, as `kubectl apply`'s strict field validation does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


def kuberay_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay.yaml").read_text()) if d}


def validate_crd(doc: dict) -> None:
    import jsonschema

    schema = json.loads((ROOT / "cluster" / "schema" / f"kuberay-{KUBERAY}-{doc['kind'].lower()}.json").read_text())
    jsonschema.Draft7Validator(strict(schema)).validate(doc)


def test_kuberay_manifests_validate_against_the_crd_schemas():
    import jsonschema

    docs = kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob"}
    for doc in docs.values():
        validate_crd(doc)
    broken = json.loads(json.dumps(docs["RayCluster"]))
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # a typo kubectl would refuse
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate_crd(broken)
    broken = json.loads(json.dumps(docs["RayCluster"]))
    broken["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match="password"):
        validate_crd(broken)


def test_kuberay_manifest_has_the_expected_groups_security_and_fits_its_nodes():
    docs = kuberay_docs()
    cluster, job = docs["RayCluster"], docs["RayJob"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "scoder-ray-auth"}  # KubeRay sets the env
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"h100x8", "h100x8-spot", "a100x8"}
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    images = set()
    for pod in pods:
        c = pod["containers"][0]
        images.add(c["image"])
        machine = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpu, mem = gke_allocatable(*MACHINES[machine])
        req = c["resources"]["requests"]
        assert float(req["cpu"]) <= cpu and quantity_gib(req["memory"]) <= mem, (machine, req, cpu, mem)
        assert req == c["resources"]["limits"]  # Guaranteed QoS: not evicted under memory pressure
        shm = {v["name"]: v for v in pod["volumes"]}[{m["mountPath"]: m for m in c["volumeMounts"]}["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert not any(e["name"].startswith("RAY_AUTH") for e in c.get("env", []))  # authOptions does it
        assert {s["secretRef"]["name"] for s in c["envFrom"]} >= {"scoder-ray-s3"}
        # The sandbox runs on every node: the runtime's default seccomp and AppArmor profiles would refuse its
        # namespaces and mounts; nothing else is granted (tests/test_sandbox.py runs it under the same limits).
        assert c["securityContext"] == {"appArmorProfile": {"type": "Unconfined"}, "seccompProfile": {"type": "Unconfined"},
                                        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, c
    for name, g in groups.items():
        assert g["minReplicas"] == 0 and g["replicas"] == 0
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == g["rayStartParams"]["num-gpus"] == "8"
    assert "gke-spot" in json.dumps(groups["h100x8-spot"]["template"]["spec"]["nodeSelector"])
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    images.add(submitter["image"])
    assert len(images) == 1  # one image, the Dockerfile's
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == spec["authOptions"]["secretName"]
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("python /home/ray/scoder-ray/jobs/run_loop.py --preset paper-7b")
    assert not any(op in entry for op in ("&&", ";", "|", "`", "$(")), entry  # KubeRay pastes it into a shell line
    assert [(t.name, t.gpus, t.max_nodes, t.accelerators) for t in node_types(str(ROOT / "cluster" / "kuberay.yaml"))] == \
        [("head", 0, 1, ()), ("h100x8", 8, 4, ("H100",)), ("h100x8-spot", 8, 4, ("H100",)), ("a100x8", 8, 4, ("A100",))]


def test_the_image_installs_through_the_same_setup_and_runs_the_venv():
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "SCODER_RAY_FLAVOUR=gpu" in docker and "bash deps/setup.sh" in docker
    assert "ENV PATH=/home/ray/scoder-ray/.venv/bin:$PATH" in docker
    assert docker.split("FROM ", 1)[1].split()[0].startswith("rayproject/ray:2.60.0-py311")  # the pinned Ray
    ignored = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs"} <= set(ignored)


@pytest.mark.slow
def test_the_gpu_flavour_resolves(tmp_path):
    """A resolver dry run of deps/gpu.txt (+ common.txt): metadata only, no CUDA wheel is downloaded (~90 s)."""
    report = tmp_path / "gpu-resolve.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-r", "deps/gpu.txt"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got["vllm"] == "0.33.0" and got["ray"] == "2.60.0" and got["deepspeed"] == "0.19.8"
    assert got["torch"].startswith("2.14") and got["datasets"] == "5.2.0"


def test_every_gpu_request_of_the_preset_has_exactly_one_gpu_model():
    for name in ("aws", "gcp", "kuberay"):
        load_config("paper-7b", [f"ray.cluster_config=cluster/{name}.yaml"])  # H100: on-demand + spot, one model
    with pytest.raises(ConfigError, match=r"^ray.accelerator_type: .*2 models \(A100, H100\)"):
        load_config("paper-7b", ["ray.accelerator_type=''"])
    with pytest.raises(ConfigError, match=r"^ray.accelerator_type: .*'B200': no GPU node type offers"):
        load_config("paper-7b", ["ray.accelerator_type=B200"])


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


def test_gpu_requests_carry_the_accelerator_type():
    from scoder_ray.generate.sample import engine_actor_options
    from scoder_ray.ray_env import gpu_options

    cfg = load_config("paper-7b")
    opts = engine_actor_options(cfg.engine, cfg.ray.accelerator_type)
    assert opts["num_gpus"] == 1 and opts["accelerator_type"] == "H100"
    assert gpu_options(8, "") == {"num_gpus": 8} and gpu_options(0, "H100") == {}
    cpu = load_config("tiny")
    assert "accelerator_type" not in engine_actor_options(cpu.engine, cpu.ray.accelerator_type)


def test_the_grafana_dashboard_charts_metrics_the_code_exports():
    """Every series the scoder-ray Grafana dashboard queries is one the loop or the progress actors export
    (with Ray's `ray_` prefix; counters with `_total`), and the start script is valid bash."""
    dash = json.loads((ROOT / "cluster" / "grafana" / "scoder-ray-dashboard.json").read_text())
    exported = set(re.findall(r'(?:Gauge|Counter)\(\s*"(scoder_ray_\w+)"', (ROOT / "scoder_ray" / "metrics.py").read_text()
                              + (ROOT / "scoder_ray" / "progress.py").read_text()))
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_(scoder_ray_\w+)", t["expr"])}
    assert queried and {q.removesuffix("_total") for q in queried} <= exported, queried - exported
    assert {"scoder_ray_stage_done_fraction", "scoder_ray_stage_rows_done_total", "scoder_ray_stage_tokens_per_s",
            "scoder_ray_stage_kept_fraction"} <= queried
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / "grafana" / "start-metrics.sh")]).returncode == 0
