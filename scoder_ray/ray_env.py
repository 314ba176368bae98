"""Connecting to Ray: a cluster when one is named, else a local instance sized by the config."""
from __future__ import annotations

import os

from scoder_ray.config import RayConf


def init_ray(conf: RayConf) -> None:
    """Idempotent `ray.init`. Inside `ray job submit` the job's cluster is found through RAY_ADDRESS."""
    import ray

    if not ray.is_initialized():
        address = conf.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(
                num_cpus=conf.num_cpus,
                object_store_memory=int(conf.object_store_gib * 2**30) if conf.object_store_gib else None,
                include_dashboard=conf.include_dashboard,
            )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs, same row order: resumed runs match


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
