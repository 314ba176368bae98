"""Seed-stage throughput and peak memory, on the whole Python standard library or on a synthetic corpus at
the paper-7b preset's scale.

    .venv/bin/python bench/seeds.py [--cpus 2]
    .venv/bin/python bench/seeds.py --synthetic-files 100000 [--max-snippets 20000]

Prints snippets/s (candidate snippets cut, featurised and deduplicated per second of stage wall time),
kept snippets, the stage's own timings (reading the source, cutting and featurising on Ray Data, the
driver's dedup decisions, writing), and peak resident memory of the driver alone and of the driver plus
every Ray process it started (sampled every 0.1 s). `--synthetic-files N` writes N generated Python files
(2-8 functions and classes each, a tenth of them copies and a twentieth near copies of earlier ones) as a
local Parquet dataset and reads it as the paper-7b preset reads starcoderdata: an `hf:` source, streamed,
with a limit. Nothing to beat: these are the figures `conf/throughput.yaml`'s seed-stage rates come from.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import psutil


WORDS = ("alpha beta gamma delta item items value values key keys name names path paths node nodes edge edges "
         "count total size width height index offset start end left right row rows col cols data buffer chunk "
         "chunks line lines word words token tokens text result results config options params args kwargs user "
         "users order orders price prices score scores weight weights limit limits queue stack graph tree root "
         "child children parent level depth cache entry entries record records field fields table tables query "
         "matrix vector point points shape grid cell cells image pixel color frame event events handler request "
         "response status error errors message payload header headers session client server port host url file "
         "files folder stream reader writer parser lexer state states step steps rate delay timeout retry batch "
         "sample samples label labels model layer input output target source dest block blocks page pages").split()
OPS = ("+", "-", "*", "//", "%")
CMPS = ("<", ">", "<=", ">=", "==", "!=")


def _expr(rng, names: list[str]) -> str:
    a, b = rng.choice(names), rng.choice(names + [str(rng.randint(0, 99))])
    kind = rng.random()
    if kind < 0.4:
        return f"{a} {rng.choice(OPS)} {b}"
    if kind < 0.6:
        return f"{rng.choice(WORDS)}_{rng.choice(WORDS)}({a}, {b})"
    if kind < 0.8:
        return f"len({a}) {rng.choice(OPS)} {rng.randint(1, 9)}"
    return f"[{rng.choice(WORDS)} for {rng.choice(WORDS)} in {a} if {rng.choice(WORDS)}]"


def _block(rng, names: list[str], indent: str, depth: int, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(n):
        kind = rng.random()
        if depth < 3 and kind < 0.15:
            out.append(f"{indent}if {rng.choice(names)} {rng.choice(CMPS)} {rng.randint(0, 50)}:")
            out += _block(rng, names, indent + "    ", depth + 1, rng.randint(1, 3))
        elif depth < 3 and kind < 0.27:
            var = rng.choice(WORDS)
            out.append(f"{indent}for {var} in {rng.choice(names)}:")
            out += _block(rng, names + [var], indent + "    ", depth + 1, rng.randint(1, 3))
        elif kind < 0.35:
            out.append(f"{indent}{rng.choice(names)}.append({_expr(rng, names)})")
        else:
            var = rng.choice(WORDS)
            out.append(f"{indent}{var} = {_expr(rng, names)}")
            names = names + [var]
    return out


def synthetic_function(rng, indent: str = "") -> str:
    args = rng.sample(WORDS, rng.randint(1, 4))
    name = "_".join(rng.sample(WORDS, rng.randint(2, 3)))
    lines = [f"{indent}def {name}({', '.join(args)}):"]
    if rng.random() < 0.6:
        lines.append(f'{indent}    """{rng.choice(WORDS).capitalize()} the {rng.choice(WORDS)} of {rng.choice(args)}."""')
    lines += _block(rng, args, indent + "    ", 1, rng.randint(3, 16))
    lines.append(f"{indent}    return {rng.choice(args)}")
    return "\n".join(lines)


def synthetic_file(rng, previous: list[str]) -> str:
    """A Python file of 2-8 top-level functions and classes, as a code corpus holds them: a tenth of the
    functions copied from an earlier file and a twentieth copied with one line changed (the duplicates
    and near duplicates the stage must find)."""
    parts = [f"import {m}" for m in rng.sample(["os", "re", "sys", "json", "math", "time", "random"], 2)]
    for _ in range(rng.randint(2, 8)):
        r = rng.random()
        if previous and r < 0.10:
            parts.append(rng.choice(previous))
            continue
        if previous and r < 0.15:
            lines = rng.choice(previous).splitlines()
            i = rng.randrange(1, len(lines))
            lines[i] = lines[i].rstrip() + f"  # {rng.choice(WORDS)}"
            parts.append("\n".join(lines))
            continue
        if r < 0.35:
            methods = [synthetic_function(rng, "    ") for _ in range(rng.randint(1, 4))]
            part = f"class {rng.choice(WORDS).capitalize()}{rng.choice(WORDS).capitalize()}:\n" + "\n\n".join(methods)
        else:
            part = synthetic_function(rng)
        parts.append(part)
        if len(previous) < 5000:
            previous.append(part)
        else:
            previous[rng.randrange(len(previous))] = part
    return "\n\n\n".join(parts) + "\n"


def write_corpus(folder: str, n_files: int, seed: int = 0) -> str:
    """n_files synthetic Python files as Parquet shards (`content`, `max_stars_repo_path`: starcoderdata's
    columns) in `folder`, which `datasets.load_dataset` reads as a local dataset; returns the hf: source."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng, previous, per_shard = random.Random(seed), [], 10_000
    for s in range(0, n_files, per_shard):
        rows = [synthetic_file(rng, previous) for _ in range(min(per_shard, n_files - s))]
        paths = [f"repo{(s + i) // 20}/mod_{s + i}.py" for i in range(len(rows))]
        pq.write_table(pa.table({"content": rows, "max_stars_repo_path": paths}),
                       os.path.join(folder, f"train-{s // per_shard:05d}.parquet"))
    return f"hf:{folder}?column=content&streaming=true&limit={n_files}"


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
    ap.add_argument("--synthetic-files", type=int, default=0, help="a generated corpus of this many files")
    ap.add_argument("--corpus-dir", default="", help="where to write (or find) it; default: a temporary folder")
    ap.add_argument("--max-snippets", type=int, default=0, help="seeds.max_snippets (0: keep all)")
    ap.add_argument("--object-store-gib", type=int, default=2)
    args = ap.parse_args()

    import ray

    from scoder_ray.config import load_config
    from scoder_ray.seeds import run_seeds
    from scoder_ray.store import RunStore

    tmp = tempfile.mkdtemp(prefix="bench-seeds-")
    sources = "[stdlib]"
    if args.synthetic_files:
        t = time.perf_counter()
        folder = args.corpus_dir or os.path.join(tmp, "corpus")
        marker = os.path.join(folder, f"_FILES_{args.synthetic_files}")
        if not os.path.exists(marker):
            write_corpus(folder, args.synthetic_files)
            open(marker, "w").close()
        sources = f"[hf:{folder}?column=content&streaming=true&limit={args.synthetic_files}]"
        print(f"corpus: {args.synthetic_files} files in {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, object_store_memory=args.object_store_gib << 30, include_dashboard=False,
             log_to_driver=False)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False

    me, peak, driver_peak, stop = psutil.Process(), [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(me))
            driver_peak[0] = max(driver_peak[0], me.memory_info().rss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config("tiny", [f"run.root={tmp}", "run.id=bench", f"seeds.max_snippets={args.max_snippets}",
                               "seeds.max_lines=80", f"seeds.sources={sources}"])
    t1 = time.perf_counter()
    done = run_seeds(cfg, RunStore.for_config(cfg))
    wall = time.perf_counter() - t1
    stop.set()
    ray.shutdown()
    result = {
        "files": done["records"],
        "candidate_snippets": done["candidates"],
        "kept_snippets": done["rows"],
        "stage_seconds": round(wall, 2),
        "timings": done["timings"],
        "ray_start_seconds": round(ray_start, 2),
        "snippets_per_s": round(done["candidates"] / wall, 1),
        "files_per_s": round(done["records"] / wall, 1),
        "peak_rss_gib": round(peak[0] / 2**30, 2),
        "driver_peak_rss_gib": round(driver_peak[0] / 2**30, 2),
        "cpus": args.cpus,
        "dropped": done["dropped"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
