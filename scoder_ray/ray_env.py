"""Connecting to Ray: a cluster when one is named, else a local instance sized by the config; the checks
that a run's state can live where the config puts it before any work starts; and how a stage's pools share
the GPUs it may hold (pool_sizes, side_by_side)."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Optional

from scoder_ray.config import Config, ConfigError, RayConf

ENDPOINT_VAR = "AWS_ENDPOINT_URL"  # read by Arrow's S3 filesystem (and boto3) on every node
_started_here = False  # whether init_ray called ray.init (not a caller's Ray, e.g. a test's)


def init_ray(conf: RayConf, env_vars: Optional[dict[str, str]] = None) -> None:
    """Idempotent `ray.init`. Inside `ray job submit` the job's cluster is found through RAY_ADDRESS.
    `env_vars` reach every Ray worker of a driver that starts or joins Ray itself (a submitted job's
    workers get the job's runtime_env instead: see `apply_endpoint`)."""
    global _started_here
    import ray

    if not ray.is_initialized():
        _started_here = True
        address = conf.address or os.environ.get("RAY_ADDRESS")
        runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars and not job_runtime_env() else {}
        if address:
            ray.init(address=address, runtime_env=runtime_env or None)
        else:
            ray.init(
                num_cpus=conf.num_cpus,
                num_gpus=conf.num_gpus,
                object_store_memory=int(conf.object_store_gib * 2**30) if conf.object_store_gib else None,
                include_dashboard=conf.include_dashboard,
                runtime_env=runtime_env or None,
            )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs, same row order: resumed runs match
    quiet_known_warnings()


def shutdown_ray() -> None:
    """Leave the Ray that init_ray started or joined (a local one stops), so that what its workers still print
    as their pools end arrives while the console filters it, not after the run's last line."""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def quiet_known_warnings() -> None:
    """Warnings about this code that a user can do nothing about, printed at every stage: Ray Data's hint to
    write small filters as expressions, and the deprecation of `ray_remote_args` in Ray 2.64 (the engine
    pools' bounded `max_restarts` has no named parameter in the pinned Ray 2.60: revisit on upgrade). And one
    that is false here: "the Dataset job will hang" when no CPU is free as a dataset starts, which is what
    side-by-side engine and feature pools do on purpose (their writes ask for no CPU: num_cpus=0). And Ray Data's
    memory detector, which the influence stage replaces with its own check."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Use 'expr' instead of 'fn'")
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
    # Ray Data's memory detector warns (a paragraph naming Ray's `memory=` argument) whenever an actor's peak comes
    # within 25% of its reservation; the influence stage measures its actors' peak and warns naming
    # influence.memory_gib when it is passed (influence/stage.peak_warning).
    import ray

    detectors = ray.data.DataContext.get_current().issue_detectors_config.detectors
    detectors[:] = [d for d in detectors if d.__name__ != "HighMemoryIssueDetector"]
    dataset_log = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _NoFreeCpuWarning) for f in dataset_log.filters):
        dataset_log.addFilter(_NoFreeCpuWarning())


class _NoFreeCpuWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def gpu_options(gpus: float, accelerator_type: str = "") -> dict[str, Any]:
    """Ray options for an actor or task of `gpus` GPUs of one model (`ray.accelerator_type`), {} for none."""
    if not gpus:
        return {}
    return {"num_gpus": gpus, **({"accelerator_type": accelerator_type} if accelerator_type else {})}


def gpu_budget(cfg: Config) -> int:
    """GPUs a stage may hold at once: ray.gpu_budget, else what ray.cluster_config's GPU node types (of
    ray.accelerator_type) scale to, else 0 (no budget: each pool keeps its configured size); less the GPUs
    of engines this driver keeps between stages (generate/kept_engines.py)."""
    from scoder_ray.generate.kept_engines import held_gpus

    budget = cfg.ray.gpu_budget
    if not budget and cfg.ray.cluster_config:
        from scoder_ray.cluster import gpu_capacity, node_types
        from scoder_ray.config import cluster_config_path

        budget = gpu_capacity(node_types(str(cluster_config_path(cfg))), cfg.ray.accelerator_type)
    return max(1, int(budget - held_gpus())) if budget else 0


def pool_sizes(pools: int, per_unit: float, size: int, budget: int = 0, at_most: int = 0) -> list[int]:
    """Sizes of the pools that run side by side when `pools` pools of engines or actors of `per_unit` GPUs
    each are due: at most `at_most` at once (0: all), each of `size` units, unless a GPU budget is set, which
    is then split evenly over them (and caps how many run at once: one unit each at least)."""
    at_once = max(1, min(pools, at_most or pools))
    if not (budget and per_unit):
        return [size] * at_once
    units = max(1, int(budget // per_unit))
    at_once = min(at_once, units)
    return [units // at_once + (1 if i < units % at_once else 0) for i in range(at_once)]


def request_gpus(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler for these bundles now (an empty list withdraws the request); a cluster
    without one ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # noqa: BLE001 - no autoscaler (a fixed or local cluster): nothing to ask
        pass


def side_by_side(jobs: dict[str, Callable[[int], Any]], sizes: list[int], per_unit_gpus: float = 0,
                 accelerator_type: str = "") -> dict[str, Any]:
    """Run each job (name -> job(pool size)) with one of `sizes` as its pool size, len(sizes) jobs at once in
    threads; a job takes a free slot and hands it on when done. On GPUs the autoscaler is asked for every
    slot's GPUs before the first pool starts, so they come up together rather than one node at a time.
    Returns {"pools": {name: [start, end, size]} (seconds since the epoch), "gpus": the cluster's GPUs in
    use, sampled while the jobs ran: {"peak", "total", "trace": [[seconds, in use], ...]}}. The first
    failure is raised with its own message."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    if per_unit_gpus:
        extra = {f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {}
        request_gpus([{"GPU": per_unit_gpus, **extra}] * sum(sizes))
    slots: queue.Queue = queue.Queue()
    for size in sizes:
        slots.put(size)
    pools: dict[str, list[float]] = {}

    def run(name: str) -> None:
        size = slots.get()
        try:
            start = time.time()
            jobs[name](size)
            pools[name] = [round(start, 3), round(time.time(), 3), size]
        finally:
            slots.put(size)

    watch = GpuWatch() if per_unit_gpus else None
    try:
        with ThreadPoolExecutor(max_workers=len(sizes), thread_name_prefix="pool") as executor:
            for future in [executor.submit(run, name) for name in jobs]:
                future.result()
    finally:
        gpus = watch.stop() if watch else None
        if per_unit_gpus:
            request_gpus([])
    return {"pools": {name: pools[name] for name in jobs}, **({"gpus": gpus} if gpus else {})}


class GpuWatch:
    """The cluster's GPUs in use (total minus available, as Ray accounts them), sampled every `every_s` in a
    thread until `stop`: how much of the budget a stage really held, and when."""

    def __init__(self, every_s: float = 0.5):
        import threading

        self.every_s, self.trace, self.total = every_s, [], 0.0
        self.started = time.time()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        while not self._done.is_set():
            try:
                total = ray.cluster_resources().get("GPU", 0.0)
                used = total - ray.available_resources().get("GPU", 0.0)
                self.total = max(self.total, total)
                self.trace.append([round(time.time() - self.started, 1), round(used, 2)])
            except Exception:  # noqa: BLE001 - a missed sample is not worth failing a stage for
                pass
            self._done.wait(self.every_s)

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self._thread.join(timeout=10)
        trace = self.trace[:: max(1, len(self.trace) // 400)]  # at most ~400 points in _DONE.json
        return {"peak": max((u for _, u in self.trace), default=0.0), "total": self.total, "trace": trace}


def in_blocks(ds, rows_per_block: int):
    """(`ds` as blocks of at most `rows_per_block` rows, the rows per block): one actor call each, given to
    `map_batches` as its batch_size (Ray Data asks for one whenever GPUs are requested; each block but the last
    holds exactly that many rows, so a batch is a block). Ray Data hands an actor pool whole blocks, so data
    read from one file (one block) would feed one engine or feature actor while the rest idle. The blocks are
    even (102 rows at 32: 26, 26, 26, 24), and materialised before the actors start: the repartition must not
    wait for CPUs the actors hold. Rows keep their input order, so the blocks, and each row's batch-mates, are
    the same on every run."""
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    rows = ds.count()
    size = max(1, -(-rows // max(1, -(-rows // rows_per_block))))
    return ds.repartition(target_num_rows_per_block=size, strict=True).materialize(), size


def table_to_batch(table) -> dict[str, Any]:
    """An Arrow block as Ray Data's numpy batch format (what a map_batches callable takes)."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def batch_to_table(batch: dict[str, Any]):
    import pyarrow as pa

    return pa.table({k: pa.array(list(v) if getattr(v, "dtype", None) == object else v) for k, v in batch.items()})


def actor_pool(actors: int, blocks: int = 0, in_flight: int = 1):
    """An actor pool that gives each actor `in_flight` blocks (of `in_blocks`) at a time, running them at once
    (an async engine actor's `engine.blocks_in_flight`; 1 for the feature actors, which work through a block
    in one call). No more than that: with every block in flight, the first actor up queued them all while the
    rest were still starting (2 engines, 2 blocks: both on one). No more actors than `blocks`, when given: an
    actor without a block would only start and idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, min(actors, blocks) if blocks else actors),
                                      max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight)


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
