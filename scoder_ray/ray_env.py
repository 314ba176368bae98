"""Connecting to Ray: a cluster when one is named, else a local instance sized by the config; and the
checks that a run's state can live where the config puts it before any work starts."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from scoder_ray.config import Config, ConfigError, RayConf

ENDPOINT_VAR = "AWS_ENDPOINT_URL"  # read by Arrow's S3 filesystem (and boto3) on every node


def init_ray(conf: RayConf, env_vars: Optional[dict[str, str]] = None) -> None:
    """Idempotent `ray.init`. Inside `ray job submit` the job's cluster is found through RAY_ADDRESS.
    `env_vars` reach every Ray worker of a driver that starts or joins Ray itself (a submitted job's
    workers get the job's runtime_env instead: see `apply_endpoint`)."""
    import ray

    if not ray.is_initialized():
        address = conf.address or os.environ.get("RAY_ADDRESS")
        runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars and not job_runtime_env() else {}
        if address:
            ray.init(address=address, runtime_env=runtime_env or None)
        else:
            ray.init(
                num_cpus=conf.num_cpus,
                object_store_memory=int(conf.object_store_gib * 2**30) if conf.object_store_gib else None,
                include_dashboard=conf.include_dashboard,
                runtime_env=runtime_env or None,
            )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs, same row order: resumed runs match
    quiet_known_warnings()


def quiet_known_warnings() -> None:
    """Warnings about this code that a user can do nothing about, printed at every stage: Ray Data's hint to
    write small filters as expressions, and the deprecation of `ray_remote_args` in Ray 2.64 (the engine
    pools' bounded `max_restarts` has no named parameter in the pinned Ray 2.60: revisit on upgrade)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Use 'expr' instead of 'fn'")
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")


def gpu_options(gpus: float, accelerator_type: str = "") -> dict[str, Any]:
    """Ray options for an actor or task of `gpus` GPUs of one model (`ray.accelerator_type`), {} for none."""
    if not gpus:
        return {}
    return {"num_gpus": gpus, **({"accelerator_type": accelerator_type} if accelerator_type else {})}


def in_blocks(ds, rows_per_block: int):
    """`ds` materialised as blocks of at most `rows_per_block` rows, one actor call each (map with
    batch_size=None). Ray Data hands an actor pool whole blocks, so data read from one file (one block)
    would feed one engine or feature actor while the rest idle. Materialised before the actors start:
    the repartition (an all-to-all step) must not wait for CPUs the actors hold. Rows keep their input
    order, so the blocks, and each row's batch-mates, are the same on every run."""
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    return ds.repartition(max(1, -(-ds.count() // rows_per_block))).materialize()


def one_block_each(actors: int):
    """An actor pool that gives each actor one block (of `in_blocks`) at a time: with more in flight, the
    first actor up queued every block while the rest were still starting (2 engines, 2 blocks: both on
    one). The actor works through a block in one call, so the gap between blocks is all this costs."""
    import ray

    return ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)


def job_config() -> Optional[dict[str, Any]]:
    """The job config Ray gives the driver of a `ray job submit` (runtime_env, metadata); None outside one."""
    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def job_runtime_env() -> Optional[dict[str, Any]]:
    """The runtime_env of the `ray job submit` this driver runs in (None outside a submitted job)."""
    config = job_config()
    return None if config is None else config.get("runtime_env") or {}


def apply_endpoint(cfg: Config) -> dict[str, str]:
    """run.endpoint_url -> $AWS_ENDPOINT_URL here, and the env vars every worker needs (for init_ray). In a
    submitted job the job's runtime_env is what workers get, so it must carry the same endpoint."""
    url = cfg.run.endpoint_url
    if not url:
        return {}
    os.environ[ENDPOINT_VAR] = url
    job = job_runtime_env()
    if job is not None and (job.get("env_vars") or {}).get(ENDPOINT_VAR) != url and "://" in cfg.run.root:
        raise ConfigError(f"run.endpoint_url={url}: this job's workers would not see it; submit with "
                          f"--runtime-env-json '{{\"env_vars\": {{\"{ENDPOINT_VAR}\": \"{url}\"}}}}' "
                          f"(or set {ENDPOINT_VAR} on every node)")
    return {ENDPOINT_VAR: url}


def check_run_root(cfg: Config, alive_nodes: int) -> None:
    """Refuse a run root that cannot work where the driver runs, before any work. A local root on a
    cluster of several nodes exists only on the node that writes it (Ray Train's rank 0, each Ray Data
    write task, the driver), unless it is a mount shared by every node (run.shared=true)."""
    root = cfg.run.root
    if "://" in root or cfg.run.shared:
        return
    if alive_nodes > 1:
        raise ConfigError(
            f"run.root={root}: a local path, but this Ray cluster has {alive_nodes} nodes, which would each write "
            f"their part of the run to their own disk. Set run.root=s3://BUCKET/PREFIX (or gs://...), or "
            f"run.shared=true if {root} is a filesystem mounted at the same path on every node (NFS, Lustre, EFS)")
    if job_runtime_env() is not None and not os.path.isabs(os.path.expanduser(root)):
        raise ConfigError(
            f"run.root={root}: a relative path inside `ray job submit` lands in the job's temporary working "
            f"directory, and a resubmitted job would not find it. Give an absolute path or an s3:// / gs:// URI")
