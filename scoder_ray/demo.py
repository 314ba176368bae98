"""`make demo`: the whole loop on the demo preset, on this machine.

A proprietary teacher is not reachable here. By default STAND-IN TEACHER SAMPLES take its place: 64 real
(problem, solution) pairs made offline from documented stdlib functions (the problem is the docstring's first
sentence), each answering the function before it in its module (`builtin:stdlib-documented`). A 135M model
serving as the teacher wrote mostly the prompt's own placeholders and copies of the seed (measured: 8 of 14
samples), which the quality gates now reject, so it is no longer the default. With `teacher.samples_file=`
(empty) a local `vllm serve` of SmolLM2-135M-Instruct answers the bootstrap requests through the same
OpenAI-compatible client, cache and retries a real teacher gets. Either way the demo shows the machinery at
small scale, not the quality a real teacher would give.

    .venv/bin/python -m scoder_ray.demo [key=value ...] [--verbose]
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from scoder_ray.config import load_config
from scoder_ray.tiny import resolve_model

PORT = int(os.environ.get("SCODER_RAY_DEMO_TEACHER_PORT", "18000"))  # fixed: the bootstrap's config key holds the URL


def start_vllm_server(model_path: str, port: int, served_name: str, max_model_len: int = 2048,
                      timeout_s: float = 300, api_key: str = "", kv_cache_gib: float = 1.0) -> subprocess.Popen:
    """A local OpenAI-compatible `vllm serve` on 127.0.0.1:port, returned once it answers /v1/models;
    with `api_key`, it refuses requests without that key (HTTP 401)."""
    from scoder_ray.generate.engine import private_ipc_dir

    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override the size
    env["VLLM_RPC_BASE_PATH"] = private_ipc_dir()  # its sockets in this process's folder, gone with it
    # The CPU build's `vllm` console script is broken (SETUP.md): run the server module.
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name",
         served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", str(max_model_len), "--enforce-eager", "--no-enable-chunked-prefill",
         "--max-num-batched-tokens", "4096", "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30)),
         *(["--api-key", api_key] if api_key else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}),
                timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve of {model_path} on port {port} exited with {proc.returncode}; "
                                   f"is the port taken? (the demo's: set SCODER_RAY_DEMO_TEACHER_PORT)")
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"vllm serve of {model_path} on port {port} did not start within {timeout_s:.0f} s")


def stop_vllm_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def main(overrides: list[str]) -> int:
    """The console as `scoder-ray run` has it: scoder-ray's lines and real warnings (`--verbose`: everything);
    everything also in RUN_DIR/logs/."""
    from scoder_ray import console
    from scoder_ray.ray_env import shutdown_ray

    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    captured = console.start("--verbose" in overrides)
    try:
        return _demo([a for a in overrides if a != "--verbose"])
    finally:
        shutdown_ray()
        captured.stop()


def _demo(overrides: list[str]) -> int:
    from scoder_ray import loop
    from scoder_ray.store import RunStore

    cfg = load_config("demo", overrides)
    if cfg.teacher.samples_file:
        print("[scoder-ray] demo: STAND-IN TEACHER SAMPLES — 64 documented stdlib functions (problem: the docstring's "
              "first sentence), each answering the function before it in its module; a real run asks teacher.base_url.",
              flush=True)
        loop.run(cfg)
        print(f"[scoder-ray] demo finished: scoder-ray status {cfg.run.root}/{cfg.run.id}", flush=True)
        return 0
    cfg = load_config("demo", [f"teacher.base_url=http://127.0.0.1:{PORT}/v1", "teacher.model=stand-in-teacher",
                               *overrides])
    store = RunStore.for_config(cfg)
    if store.read_done("bootstrap") is None:
        print("[scoder-ray] demo: STAND-IN TEACHER — a local `vllm serve` of SmolLM2-135M-Instruct plays the "
              "proprietary teacher (OpenAI-compatible API on 127.0.0.1); it stops after the bootstrap.", flush=True)
        teacher = start_vllm_server(resolve_model(cfg.models.synthesizer, cfg.models.cache_dir), PORT,
                                    "stand-in-teacher", kv_cache_gib=cfg.engine.kv_cache_gib)
        try:
            for name in ("seeds", "bootstrap"):
                done = loop.run_stage(cfg, name)
                print(f"[scoder-ray] demo: {name}: {done['rows']} rows", flush=True)
        finally:
            stop_vllm_server(teacher)
    loop.run(cfg)
    print(f"[scoder-ray] demo finished: scoder-ray status {cfg.run.root}/{cfg.run.id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
