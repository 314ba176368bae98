"""Seed-stage throughput and peak memory on the whole Python standard library.

    .venv/bin/python bench/seeds.py [--cpus 2]

Prints snippets/s (candidate snippets cut, featurised and deduplicated per second of stage wall time),
kept snippets, and peak resident memory of the driver plus every Ray process it started (sampled every
0.1 s). Nothing to beat yet: this is the baseline later changes are measured against.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from scoder_ray.config import load_config
    from scoder_ray.seeds import run_seeds
    from scoder_ray.store import RunStore

    tmp = tempfile.mkdtemp(prefix="bench-seeds-")
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, object_store_memory=2 << 30, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False

    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(me))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config("tiny", [f"run.root={tmp}", "run.id=bench", "seeds.max_snippets=0", "seeds.max_lines=80"])
    t1 = time.perf_counter()
    done = run_seeds(cfg, RunStore.for_config(cfg))
    wall = time.perf_counter() - t1
    stop.set()
    ray.shutdown()
    result = {
        "files": done["files"],
        "candidate_snippets": done["candidates"],
        "kept_snippets": done["rows"],
        "stage_seconds": round(wall, 2),
        "ray_start_seconds": round(ray_start, 2),
        "snippets_per_s": round(done["candidates"] / wall, 1),
        "peak_rss_gib": round(peak[0] / 2**30, 2),
        "cpus": args.cpus,
        "dropped": done["dropped"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
