"""What a cluster config offers, and whether a preset fits it: checked before any compute starts.

Reads a Ray autoscaler YAML (`available_node_types`) or a KubeRay manifest (`RayCluster` worker groups)
into node types {name: GPUs, CPUs, max nodes, GPU model}, then checks every GPU request of the config: the
GPU model it asks for (`ray.accelerator_type`) must be offered, and only one model may serve it (a cluster
with A100 and H100 groups needs `ray.accelerator_type`); one engine, one training worker or one influence
actor must fit on a single node type of that model, and a whole engine pool or training job in the GPUs
those node types scale to. On-demand and spot groups of one model are one pool.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class NodeType:
    name: str
    gpus: int
    cpus: int
    max_nodes: int
    accelerators: tuple[str, ...] = ()  # Ray's accelerator_type:X resources the node type declares
    head: bool = False


def _accelerators(resources: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")))


def _int(value: Any) -> int:
    return int(float(str(value).strip('"'))) if value not in (None, "") else 0


def node_types(path: str) -> list[NodeType]:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    types = []
    for doc in docs:
        if "available_node_types" in doc:  # Ray autoscaler
            head = doc.get("head_node_type")
            for name, t in doc["available_node_types"].items():
                res = t.get("resources") or {}
                types.append(NodeType(name, _int(res.get("GPU")), _int(res.get("CPU")),
                                      1 if name == head else _int(t.get("max_workers", doc.get("max_workers", 0))),
                                      _accelerators(res), name == head))
        elif doc.get("kind") == "RayCluster":
            spec = doc["spec"]
            head = spec["headGroupSpec"]
            limits = head["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
            types.append(NodeType("head", _int(head.get("rayStartParams", {}).get("num-gpus")),
                                  _int(head.get("rayStartParams", {}).get("num-cpus", limits.get("cpu"))), 1, head=True))
            for g in spec.get("workerGroupSpecs", []):
                limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
                gpus = _int(g.get("rayStartParams", {}).get("num-gpus", limits.get("nvidia.com/gpu")))
                custom = str(g.get("rayStartParams", {}).get("resources", "{}"))
                custom = json.loads(json.loads(custom) if custom.startswith('"') else custom)  # KubeRay's '"{\"X\": 1}"'
                types.append(NodeType(g["groupName"], gpus, _int(limits.get("cpu")), _int(g.get("maxReplicas")),
                                      _accelerators(custom)))
    if not types:
        raise ValueError(f"{path}: neither a Ray autoscaler config (available_node_types) nor a KubeRay RayCluster")
    return types


def gpu_capacity(types: list[NodeType], accelerator_type: str = "") -> int:
    """GPUs the node types scale to (only those of `accelerator_type`, when set)."""
    return sum(t.gpus * t.max_nodes for t in types if t.gpus and (not accelerator_type or accelerator_type in t.accelerators))


def fit_problems(cfg, types: list[NodeType]) -> list[tuple[str, str]]:
    """(config key, problem) for every GPU request the node types cannot serve."""
    requests = {"engine.gpus_per_engine": (cfg.engine.gpus_per_engine, cfg.engine.num_engines),
                "influence.gpus_per_actor": (cfg.influence.gpus_per_actor, cfg.influence.num_actors)}
    for name in ("synthesizer", "scoder", "warmup"):
        t = getattr(cfg.train, name)
        requests[f"train.{name}.gpus_per_worker"] = (t.gpus_per_worker, t.num_workers)
    if not any(per_unit for per_unit, _ in requests.values()):
        return []
    gpu_types = [t for t in types if t.gpus] or types
    models = sorted({a for t in gpu_types for a in t.accelerators})
    wanted = cfg.ray.accelerator_type
    if wanted:
        gpu_types = [t for t in gpu_types if wanted in t.accelerators]
        if not gpu_types:
            return [("ray.accelerator_type", f"{wanted!r}: no GPU node type offers accelerator_type:{wanted} "
                                             f"(offered: {', '.join(models) or 'none'})")]
    elif len(models) > 1:
        return [("ray.accelerator_type", f"empty, but the cluster has GPU node types of {len(models)} models "
                                         f"({', '.join(models)}): set it so one pool never mixes GPU models")]
    most = max(t.gpus for t in gpu_types)
    total = gpu_capacity(gpu_types)
    offer = ", ".join(f"{t.name}: {t.gpus} GPU x {t.max_nodes}" for t in gpu_types)
    problems = []
    for key, (per_unit, units) in requests.items():
        if per_unit > most:
            problems.append((key, f"{per_unit} GPUs on one node, but the largest node type has {most} ({offer})"))
        elif per_unit * units > total:
            problems.append((key, f"{units} x {per_unit} = {per_unit * units} GPUs at once, but the cluster scales "
                                  f"to {total} ({offer})"))
    return problems
