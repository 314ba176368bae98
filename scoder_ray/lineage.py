"""What stage keys and seeding depend on, below every stage: input digests, per-record seeds, the seed
subset an iteration uses, and the synthesizer an iteration builds on. Stages import these; nothing here
imports a stage."""
from __future__ import annotations

import hashlib
from typing import Any

from scoder_ray.seeds import seeds_uri
from scoder_ray.store import RunStore, filesystem


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from the run seed and record ids: the same record always samples the same way."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def input_digest(uri: str) -> str:
    """Digest of a data path's contents (a file, or every file of a folder with its relative name): an
    edited input redoes the stage that read it, a touched but unchanged one does not."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    h = hashlib.sha256()
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        h.update(f"{i.path[len(path):]}\0{i.size}\0".encode())
        with fs.open_input_stream(i.path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def pick_seeds(store: RunStore, n: int, run_seed: int) -> list[dict[str, str]]:
    """`n` seeds chosen by hash of (run seed, seed_id): stable, and independent of file order."""
    import pyarrow.parquet as pq

    fs, path = filesystem(seeds_uri(store))
    table = pq.read_table(path, filesystem=fs, columns=["seed_id", "snippet", "lang"])
    rows = sorted(table.to_pylist(), key=lambda r: hashlib.sha1(f"{run_seed}:{r['seed_id']}".encode()).hexdigest())
    return rows[:n] if n else rows


def synthesizer_stage(store: RunStore, iteration: int) -> str:
    """The training stage whose checkpoints iteration `iteration` samples from: the last iteration before it
    that trained. An iteration that kept nothing trained nothing (its `train` stage is marked `empty`), and
    one marked `stop` ended the iterations. A stage not run yet is named as is (its callers say: run it)."""
    stage = "train_synthesizer"
    for u in range(1, iteration):
        done = store.read_done(f"iter_{u:02d}/train")
        if done is None:
            return f"iter_{u:02d}/train"
        if not done.get("empty"):
            stage = f"iter_{u:02d}/train"
        elif done.get("stop"):
            break
    return stage


def stopped_after(store: RunStore, iteration: int) -> str:
    """The iteration before `iteration` after which the loop stopped (loop.on_empty_iteration=stop), or ''."""
    for u in range(1, iteration):
        done = store.read_done(f"iter_{u:02d}/train")
        if done is not None and done.get("stop"):
            return f"iter_{u:02d}"
    return ""


def synthesizer_digest(store: RunStore, iteration: int) -> str:
    done = store.read_done(synthesizer_stage(store, iteration))
    return done["output_digest"] if done else ""


def synthesizer_checkpoints(store: RunStore, iteration: int) -> list[tuple[str, str]]:
    """The M checkpoints of the synthesizer that iteration `iteration` samples from."""
    stage = synthesizer_stage(store, iteration)
    done = store.read_done(stage)
    if done is None:
        raise ValueError(f"sampling for iteration {iteration} needs the synthesizer's checkpoints: run {stage} first")
    return [(c["name"], f"{store.uri(stage)}/{c['name']}") for c in done["checkpoints"]]


def current_synthesizer(store: RunStore, iteration: int) -> str:
    """The model folder (URI) iteration `iteration` builds on: the last checkpoint of the synthesizer it samples."""
    return synthesizer_checkpoints(store, iteration)[-1][1]
