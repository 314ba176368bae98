"""Run-store and model-cache costs on local disk and on an S3-compatible server (moto on 127.0.0.1).

    .venv/bin/python bench/store.py [--files 64] [--rows 2000] [--model builtin:smollm2-135m]

Prints, per root: the time to write a stage of N Parquet files, to commit it (fsync on local disk, the
`_DONE.json` that names the attempt, collecting old attempts), to find and read it back; and for the
node-local model cache: the first `local_model` of a model folder in the run root (a download) against
the second on the same node (ratio; goal < 5%).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stage_times(root: str, files: int, rows: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scoder_ray.store import RunStore, filesystem, write_table

    store = RunStore(root, "bench")
    table = pa.table({"cand_id": [f"{i:016x}" for i in range(rows)], "text": ["x" * 200] * rows})
    marks: dict[str, float] = {}

    def produce(uri: str) -> dict:
        for i in range(files):
            write_table(f"{uri}/data/part-{i:05d}.parquet", table)
        marks["written"] = time.perf_counter()
        return {"rows": files * rows}

    start = time.perf_counter()
    store.run_stage("iter_01/sample", {}, {"n": str(time.time())}, produce)
    committed = time.perf_counter()
    fs, path = filesystem(store.uri("iter_01/sample") + "/data")
    n = pq.read_table(path, filesystem=fs).num_rows
    read = time.perf_counter()
    assert n == files * rows
    return {"write_s": marks["written"] - start, "commit_s": committed - marks["written"], "read_s": read - committed}


def cache_times(model_dir: str, root: str) -> tuple[float, float, int]:
    import pyarrow.fs as pafs

    from scoder_ray.config import ModelsConf
    from scoder_ray.model_cache import local_model
    from scoder_ray.store import filesystem

    uri = f"{root}/bench-model/ckpt_01"
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(model_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    size = sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file())
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    models = ModelsConf(cache_dir=cache)
    try:
        t0 = time.perf_counter()
        local_model(uri, models)
        t1 = time.perf_counter()
        local_model(uri, models)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return t1 - t0, t2 - t1, size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--model", default="builtin:smollm2-135m", help="model folder copied into the run root")
    args = p.parse_args()
    import os

    from scoder_ray import s3_local
    from scoder_ray.tiny import resolve_model

    proc, env = s3_local.start(buckets=("bench",))
    os.environ.update(env)
    local = tempfile.mkdtemp(prefix="bench-store-")
    try:
        for name, root in (("local disk", local), ("S3 (moto, 127.0.0.1)", "s3://bench/runs")):
            t = stage_times(root, args.files, args.rows)
            print(f"{name:>22}: stage of {args.files} Parquet files ({args.files * args.rows} rows): write "
                  f"{t['write_s']:.3f} s, commit {t['commit_s']:.3f} s, read {t['read_s']:.3f} s", flush=True)
        model_dir = resolve_model(args.model, "~/.cache/scoder-ray")
        first, second, size = cache_times(model_dir, "s3://bench/runs")
        print(f"node-local model cache ({args.model}, {size / 2**20:.0f} MiB from S3): first use {first:.3f} s, "
              f"second use {second * 1000:.2f} ms -> ratio {second / first:.4f} (goal < 0.05)")
    finally:
        s3_local.stop(proc)
        shutil.rmtree(local, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
