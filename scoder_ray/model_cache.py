"""One way to get a model folder onto this node: `local_model(ref, models)`.

Every consumer of a model — vLLM engines, training workers, the warm-up, feature actors, evaluation —
calls it on the node where it runs, so nothing relies on a path that happens to exist on another node:

- `builtin:NAME`   built on this node into `models.cache_dir` (deterministic by seed; once per node)
- `hf:ORG/NAME`    the hub id, which vLLM and transformers fetch into the node's HF cache
- `s3://…`, `gs://…` (a run's own checkpoints on an object-store root, or a user's model folder):
                   copied into `<cache_dir>/node-models/<key>/`, where key is a digest of the URI. Run
                   folders are never rewritten once committed (each attempt has its own folder), so the
                   URI names the content. The first caller downloads under an exclusive file lock;
                   concurrent callers on the node wait for it; the copy is renamed into place only when
                   every file arrived with its size, so a partial download is never used. Entries are
                   evicted least recently used above `models.node_cache_gib`, skipping any a live
                   process on the node still holds (a shared lock held for the life of the process).
- a local folder   used where it is (a local run root on one machine, or a shared mount); a folder that
                   is missing on this node is an error naming the node.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

CACHE_SUBDIR = "node-models"
_HELD: dict[str, Any] = {}  # key -> open lock file: shared locks held while this process may use the entry


def local_model(ref: str, models) -> str:
    """A path transformers/vLLM/PEFT load on this node (or a hub id). `models`: a ModelsConf."""
    from scoder_ray.tiny import resolve_model

    if ref.startswith(("builtin:", "hf:")):
        return resolve_model(ref, models.cache_dir, models.tiny_seed)
    if "://" in ref:
        return str(fetch_folder(ref, Path(models.cache_dir).expanduser() / CACHE_SUBDIR, models.node_cache_gib))
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise FileNotFoundError(
        f"model folder {ref} does not exist on node {socket.gethostname()}: a folder must be on every node that "
        f"loads it — put it in an object store (s3://, gs://), on a mount shared by every node, or name a hub id "
        f"as hf:ORG/NAME")


def cache_key(uri: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:20]}-{name}"


def fetch_folder(uri: str, cache: Path, max_gib: float) -> Path:
    """The local copy of the folder at `uri` (see the module doc)."""
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri)
    dest = cache / key
    if key not in _HELD:  # in use by this process from now on: never evicted under it
        use = open(cache / f".{key}.use", "a+")
        fcntl.flock(use, fcntl.LOCK_SH)
        _HELD[key] = use
    with open(cache / f".{key}.download", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a download by another process on this node
        if not (dest / ".complete").is_file():
            _download(uri, dest)
        os.utime(dest / ".complete")  # last use, for eviction
    evict(cache, max_gib, keep=key)
    return dest


def _download(uri: str, dest: Path) -> None:
    import pyarrow.fs as pafs

    from scoder_ray.store import filesystem

    fs, path = filesystem(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"model folder {uri} is empty or does not exist")
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)  # an earlier copy that never completed
    started = time.time()
    files = [(tmp / info.path[len(path.rstrip("/")) + 1:], info.size) for info in infos]
    for local, _ in files:  # Arrow creates no local folders on its own
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    use_threads=True)
    for local, size in files:  # every file, with its size: a cut-off copy is never renamed into place
        if not local.is_file() or local.stat().st_size != size:
            raise OSError(f"copy of {uri} is incomplete: {local} (expected {size} bytes)")
    (tmp / ".complete").write_text(f"{uri}\n{sum(i.size for i in infos)} bytes in {time.time() - started:.1f}s\n")
    tmp.rename(dest)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def evict(cache: Path, max_gib: float, keep: str = "") -> list[str]:
    """Delete the least recently used complete entries until the cache fits `max_gib`; entries that a live
    process holds (shared lock) are skipped. Returns the evicted keys."""
    entries = []
    for d in cache.iterdir():
        if d.is_dir() and (d / ".complete").is_file():
            entries.append((os.stat(d / ".complete").st_mtime, d.name, _size(d)))
    total = sum(size for _, _, size in entries)
    evicted = []
    for _, key, size in sorted(entries):
        if total <= max_gib * 2**30:
            break
        if key == keep or key in _HELD:
            continue
        with open(cache / f".{key}.use", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use on this node
            shutil.rmtree(cache / key, ignore_errors=True)
        total -= size
        evicted.append(key)
    return evicted
