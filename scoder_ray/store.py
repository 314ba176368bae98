"""The run directory is the state: one folder per stage, committed by a `_DONE.json` written last.

    <root>/<run_id>/config.yaml                       resolved config (older versions kept as config.<n>.yaml)
    <root>/<run_id>/_LEASE.json                       the driver that holds the run (host, pid, Ray job)
    <root>/<run_id>/<stage>/<attempt>/...             one attempt's output (Parquet files or model folders)
    <root>/<run_id>/<stage>/_DONE.json                written last: which attempt, key, counts, timings

`root` is a local path or an object-store URI (s3://, gs://): object stores cannot rename folders, so
nothing is renamed. A stage writes into a fresh attempt folder; when it is complete (every file fsync'd
on local disks) `_DONE.json` names it, and that write is the commit: readers read only the attempt a
`_DONE.json` names (`uri(stage)`), and attempts it does not name are deleted. A rerun skips a stage
whose key — a digest of its config sections and its inputs' digests — matches, and redoes it otherwise.
One driver at a time holds a lease on the run (`RunLease`), so no driver deletes another's attempt.
A stage run with `resume=True` (the generation stages, whose rows each depend on their own seed) marks its
attempt with its key (`_ATTEMPT.json`); a rerun with the same key goes on in the interrupted attempt, and
the stage skips the rows already written there (`written_values`) instead of paying for them again.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow.fs as pafs

from scoder_ray.config import AtDefault, Config, config_from_dict, digest, to_yaml

DONE = "_DONE.json"
LEASE = "_LEASE.json"
ATTEMPT = "attempt-"
ATTEMPT_KEY = "_ATTEMPT.json"  # in a resumable attempt: the stage key it was begun with


class StoreError(ValueError):
    """A run directory that cannot be used as asked (held by another driver, unreadable state)."""


@dataclass
class StageState:
    name: str
    state: str  # done | stale | partial | missing
    done: Optional[dict[str, Any]] = None


class RunStore:
    def __init__(self, root: str, run_id: str, create: bool = True):
        self.root = root
        self.fs, base = filesystem(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
        self.base = f"{base.rstrip('/')}/{run_id}"
        self.run_id = run_id
        self.lease: Optional[RunLease] = None
        if create:
            self.fs.create_dir(self.base, recursive=True)

    @classmethod
    def for_config(cls, cfg: Config) -> "RunStore":
        return cls(cfg.run.root, cfg.run.id)

    @classmethod
    def open(cls, run_dir: str) -> "RunStore":
        """A store for an existing run directory (`scoder-ray status RUN_DIR`); refuses one that is not a run."""
        root, run_id = run_dir.rstrip("/").rsplit("/", 1) if "/" in run_dir.rstrip("/") else (".", run_dir)
        try:
            store = cls(root, run_id, create=False)
            found = store._exists(f"{store.base}/config.yaml")
        except OSError as e:  # an unreachable endpoint or bucket: one line, not Arrow's traceback
            raise StoreError(f"{run_dir}: cannot read it: {str(e).strip()}") from e
        if not found:
            raise StoreError(f"{run_dir}: not a run directory (no config.yaml)")
        return store

    # -- paths ------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        """Filesystem path (no scheme) of a stage's folder: its attempts and its `_DONE.json`."""
        return f"{self.base}/{stage}"

    def path(self, stage: str) -> str:
        """Filesystem path (no scheme) of the committed attempt of a stage: where its files are."""
        done = self.read_done(stage)
        if done is None:
            raise StoreError(f"stage {stage!r} of {self.uri_of(self.base)} is not done")
        attempt = done.get("attempt")
        return f"{self.stage_dir(stage)}/{attempt}" if attempt else self.stage_dir(stage)

    def uri(self, stage: str) -> str:
        """Full URI (local path or s3://...) of the committed attempt of a stage, for readers."""
        return self.uri_of(self.path(stage))

    def file_uri(self, name: str) -> str:
        """Full URI of a file at the run's top level (config.yaml, report.html)."""
        return self.uri_of(f"{self.base}/{name}")

    def uri_of(self, path: str) -> str:
        return self._prefix + path

    def identity(self) -> dict[str, Optional[str]]:
        """What names this run on a machine (its drivers' scratch files): root and id, and for s3:// the endpoint,
        since two S3-compatible stores (a MinIO here, AWS there) can hold the same bucket path."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if self.root.startswith("s3://") else None
        return {"root": self.root, "run_id": self.run_id, "endpoint": endpoint}

    # -- config -----------------------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        """Write config.yaml once; if a rerun brings a different config, keep the old as config.<n>.yaml."""
        text = to_yaml(cfg)
        path = f"{self.base}/config.yaml"
        old = self._read_text(path)
        if old == text:
            return
        if old is not None:
            n = 1
            while self._exists(f"{self.base}/config.{n}.yaml"):
                n += 1
            self._write_text_atomic(f"{self.base}/config.{n}.yaml", old)
        self._write_text_atomic(path, text)

    def read_config(self) -> Optional[Config]:
        import yaml

        text = self._read_text(f"{self.base}/config.yaml")
        return None if text is None else config_from_dict(yaml.safe_load(text))

    # -- stages -----------------------------------------------------------------------------------
    def read_done(self, stage: str) -> Optional[dict[str, Any]]:
        path = f"{self.stage_dir(stage)}/{DONE}"
        text = self._read_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.uri_of(path)} is corrupt ({e}); delete it to redo stage {stage!r}") from None

    def stage_key(self, config_sections: dict[str, Any], inputs: dict[str, str]) -> str:
        return digest({"config": {k: digest(v) for k, v in config_sections.items()}, "inputs": inputs})

    def state(self, stage: str, key: Optional[str] = None) -> StageState:
        done = self.read_done(stage)
        if done is not None:
            return StageState(stage, "done" if key is None or done["key"] == key else "stale", done)
        return StageState(stage, "partial" if self._attempts(stage) else "missing")

    def run_stage(
        self,
        stage: str,
        config_sections: dict[str, Any],
        inputs: dict[str, str],
        produce: Callable[[str], dict[str, Any]],
        force: bool = False,
        started: Optional[float] = None,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Run `produce(attempt_uri) -> summary` unless the stage is already done with the same key.

        `summary` must hold `rows` (the output's row count); everything in it lands in `_DONE.json`.
        `started` (a time.time()) is when the stage's work began, if before `produce` (a stage whose parts
        are sub-stages of their own): its `seconds` then include them. Returns the `_DONE.json` content (the
        old one when skipped). `resume`: an interrupted attempt begun with the same key (and not `force`) is
        handed to `produce` again, its files as they were left; `produce` writes only what they lack.
        """
        defaults = {k: v.value for k, v in config_sections.items() if isinstance(v, AtDefault)}
        config_sections = {k: v for k, v in config_sections.items() if k not in defaults}
        key = self.stage_key(config_sections, inputs)
        current = self.state(stage, key)
        if current.state == "done" and not force:
            damaged = self.verify(stage, current.done, hashes=False)  # a listing: sizes, not bytes
            if not damaged:
                return {**current.done, "skipped": True}  # type: ignore[dict-item]
            print(f"[scoder-ray] {stage}: its output changed since it was written ({'; '.join(damaged[:3])}): "
                  "redoing it", flush=True)
        keep = (current.done or {}).get("attempt")
        resumed = self.resumable_attempt(stage, key) if resume and not force else None
        self._collect(stage, {keep, resumed})  # leftovers of interrupted attempts (the lease says no one else writes them)
        if resumed:
            attempt = resumed
            out = f"{self.stage_dir(stage)}/{attempt}"
            print(f"[scoder-ray] {stage}: resuming the interrupted attempt {attempt} (same config and inputs): "
                  "what it wrote is kept", flush=True)
        else:
            attempt = f"{ATTEMPT}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
            out = f"{self.stage_dir(stage)}/{attempt}"
            self.fs.create_dir(out, recursive=True)
            if resume:
                self._write_text_atomic(f"{out}/{ATTEMPT_KEY}", json.dumps({"stage": stage, "key": key}))
        started = started or time.time()
        summary = produce(self.uri_of(out))
        if "rows" not in summary:
            raise ValueError(f"stage {stage!r} returned no row count")
        if self.local:
            _fsync_tree(out)
        if self.lease is not None:
            self.lease.check()  # a driver that lost its lease must not commit over the new holder's work
        done = {
            "stage": stage,
            "key": key,
            "attempt": attempt,
            "config_digests": {k: digest(v) for k, v in config_sections.items()},
            **({"config_defaults": {k: digest(v) for k, v in defaults.items()}} if defaults else {}),
            "inputs": inputs,
            "output_digest": digest({"key": key, "rows": summary["rows"]}),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 3),
            **summary,
            "manifest": self._manifest(out),  # after the summary: a stage's own keys never replace it
        }
        self._write_text_atomic(f"{self.stage_dir(stage)}/{DONE}", json.dumps(done, indent=2, sort_keys=True, default=str))
        self._collect(stage, attempt)  # the attempt it replaced
        return done

    def _manifest(self, out: str) -> dict[str, list]:
        """{path in the attempt: [size, sha256]} of a finished attempt's files. The sha256 only on a local root
        (the bytes are still in the page cache); on an object store it would mean downloading them again."""
        files: dict[str, list] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(out, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                files[info.path[len(out) + 1:]] = [info.size, _sha256(info.path) if self.local else ""]
        return dict(sorted(files.items()))

    def verify(self, stage: str, done: dict[str, Any], hashes: bool = True) -> list[str]:
        """What differs between a finished stage's files and the manifest its `_DONE.json` holds: missing,
        unexpected or resized files, and (with `hashes`, where recorded) changed bytes. [] when they agree;
        stages committed before manifests existed are not checked."""
        expected = done.get("manifest")
        if expected is None:
            return []
        out = f"{self.stage_dir(stage)}/{done['attempt']}"
        problems = []
        found = {info.path[len(out) + 1:]: info
                 for info in self.fs.get_file_info(pafs.FileSelector(out, recursive=True, allow_not_found=True))
                 if info.type == pafs.FileType.File}
        for rel, (size, sha) in expected.items():
            info = found.get(rel)
            if info is None:
                problems.append(f"{rel} is missing")
            elif info.size != size:
                problems.append(f"{rel} has {info.size} bytes, {size} when written")
            elif hashes and sha and _sha256(info.path) != sha:
                problems.append(f"{rel} has other bytes than when written (sha256)")
        problems += [f"{rel} was not written by the stage" for rel in sorted(set(found) - set(expected))]
        return problems

    def stages(self) -> list[StageState]:
        """Every stage under the run, finished or not, in path order."""
        names: set[str] = set()
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(self.base) + 1:]
            if info.type == pafs.FileType.File and rel.endswith("/" + DONE):
                names.add(rel[: -len(DONE) - 1])
            elif info.type == pafs.FileType.Directory and "/" in rel and rel.rsplit("/", 1)[1].startswith(ATTEMPT):
                names.add(rel.rsplit("/", 1)[0])
        names = {n for n in names if not any(part.startswith(ATTEMPT) for part in n.split("/"))}
        return [self.state(n) for n in sorted(names)]

    def stale_sections(self, state: StageState, cfg: Config) -> list[str]:
        """The config sections whose current digest differs from the one the stage was built with (those it left
        out of its key at their default included)."""
        if not state.done:
            return []
        recorded = {**state.done.get("config_digests", {}), **state.done.get("config_defaults", {})}
        return [k for k, d in recorded.items() if digest(_select(cfg, k)) != d]

    # -- lease ------------------------------------------------------------------------------------
    def acquire_lease(self, ttl_s: float = 90.0) -> "RunLease":
        self.lease = RunLease(self, ttl_s)
        self.lease.acquire()
        return self.lease

    def read_lease(self) -> Optional[dict[str, Any]]:
        text = self._read_text(f"{self.base}/{LEASE}")
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None

    # -- small file helpers -----------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _attempts(self, stage: str) -> list[str]:
        selector = pafs.FileSelector(self.stage_dir(stage), allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.Directory and i.base_name.startswith(ATTEMPT)]

    def _collect(self, stage: str, keep: Optional[str] | set) -> None:
        """Delete a stage's attempts other than `keep` (one name, or a set of them)."""
        keep = keep if isinstance(keep, set) else {keep}
        for path in self._attempts(stage):
            if path.rsplit("/", 1)[1] not in keep:
                self.fs.delete_dir(path)

    def rows_written(self, stage: str, attempt: str) -> int:
        """Rows in the Parquet files of an attempt's `data` folders (Parquet footers only: cheap on an object
        store), for `status` while a stage runs or after it was interrupted; a file still being written or
        cut off counts 0."""
        import pyarrow.parquet as pq

        total = 0
        for path in _parquet_files(self.fs, f"{self.stage_dir(stage)}/{attempt}"):
            if "/data/" in path:
                try:
                    with self.fs.open_input_file(path) as f:
                        total += pq.ParquetFile(f).metadata.num_rows
                except (OSError, ValueError):
                    continue
        return total

    def resumable_attempt(self, stage: str, key: Optional[str] = None) -> Optional[str]:
        """The newest attempt of `stage` that is not committed and was begun resumable (with `key`, when
        given), or None."""
        done = self.read_done(stage)
        for path in sorted(self._attempts(stage), reverse=True):  # names begin with their UTC start time
            name = path.rsplit("/", 1)[1]
            if done and done.get("attempt") == name:
                continue
            try:
                marker = json.loads(self._read_text(f"{path}/{ATTEMPT_KEY}") or "{}")
            except json.JSONDecodeError:
                continue
            if marker.get("key") and key in (None, marker["key"]):
                return name
        return None

    def _read_text(self, path: str) -> Optional[str]:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_log(self, name: str, data: bytes) -> None:
        """RUN_DIR/logs/<name>, replaced whole (the driver's console log, copied after every stage)."""
        self.fs.create_dir(f"{self.base}/logs", recursive=True)
        self._write_bytes_atomic(f"{self.base}/logs/{name}", data)

    def _write_text_atomic(self, path: str, text: str) -> None:
        self._write_bytes_atomic(path, text.encode())

    def _write_bytes_atomic(self, path: str, data: bytes) -> None:
        _write_atomic(self.fs, path, data)


class RunLease:
    """One driver per run: `_LEASE.json` names the holder (host, pid, process start, Ray job) and a
    heartbeat it refreshes every ttl/3 seconds from a thread. A second driver is refused while the holder
    is alive; a lease whose holder is gone (same host, process dead) or whose heartbeat is older than the
    ttl is taken over. Object stores give no compare-and-swap through Arrow, so acquiring writes, waits
    and reads back: two drivers starting within that window cannot both keep the lease."""

    def __init__(self, store: RunStore, ttl_s: float):
        import psutil

        self.store, self.ttl_s = store, ttl_s
        self.path = f"{store.base}/{LEASE}"
        me = psutil.Process()
        self.record = {"token": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid(),
                       "process_started": me.create_time(), "ray_job": ray_job_label(),
                       "acquired_at": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    def acquire(self) -> None:
        held = self.store.read_lease()
        if held and held.get("token") != self.record["token"] and holder_alive(held, self.ttl_s):
            raise StoreError(f"run {self.store.uri_of(self.store.base)} is held by another driver: {describe(held)}. "
                             f"Wait for it, stop it (ray job stop ...), or use another run.id")
        self._write()
        time.sleep(min(2.0, self.ttl_s / 30))
        now = self.store.read_lease()
        if not now or now.get("token") != self.record["token"]:
            raise StoreError(f"run {self.store.uri_of(self.store.base)} was taken by another driver starting at the "
                             f"same time: {describe(now or {})}")
        self._thread = threading.Thread(target=self._beat, name="scoder-ray-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self.lost:
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        held = self.store.read_lease()
        if held and held.get("token") == self.record["token"]:
            self.store.fs.delete_file(self.path)

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        self.store._write_text_atomic(self.path, json.dumps(self.record, indent=2))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and self._beat_once():
            pass

    def _beat_once(self) -> bool:
        """Refresh the heartbeat; False (and `lost` set) when another driver holds the lease now."""
        held = self.store.read_lease()
        if held and held.get("token") != self.record["token"]:
            self.lost = f"this driver's lease on {self.store.uri_of(self.store.base)} was taken over by {describe(held)}"
            print(f"[scoder-ray] {self.lost}", flush=True)
            return False
        try:
            self._write()
        except OSError as e:  # a store hiccup: the next beat retries before the ttl runs out
            print(f"[scoder-ray] lease heartbeat failed: {e}", flush=True)
        return True


def holder_alive(held: dict[str, Any], ttl_s: float) -> bool:
    """False when the holder's process is gone (same host) or its heartbeat is older than `ttl_s`."""
    import psutil

    if time.time() - float(held.get("heartbeat", 0)) > ttl_s:
        return False
    if held.get("host") == socket.gethostname():
        try:
            return abs(psutil.Process(int(held["pid"])).create_time() - float(held["process_started"])) < 1.0
        except (psutil.NoSuchProcess, KeyError, ValueError):
            return False
    return True


def describe(held: dict[str, Any]) -> str:
    age = time.time() - float(held.get("heartbeat", 0))
    return (f"host {held.get('host')}, pid {held.get('pid')}, Ray job {held.get('ray_job') or '-'}, "
            f"heartbeat {age:.0f}s ago")


def ray_job_label() -> str:
    """The submission id of a `ray job submit` driver (from the job config Ray gives it), else ''."""
    from scoder_ray.ray_env import job_config

    return str(((job_config() or {}).get("metadata") or {}).get("job_submission_id", ""))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a local path or a URI such as s3://bucket/key. S3-compatible
    endpoints come from $AWS_ENDPOINT_URL (set from run.endpoint_url), credentials from AWS's chain."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def check_root(root: str) -> None:
    """Before any work: a small object can be written under the run root, read back and deleted, from here
    (the bucket exists, the endpoint answers, the credentials are accepted; a local folder is writable).
    Otherwise a StoreError of one line naming run.root, the cause, and for s3:// the endpoint asked."""
    try:
        fs, base = filesystem(root)
        fs.create_dir(base, recursive=True)
        probe = f"{base.rstrip('/')}/.scoder-ray-probe-{secrets.token_hex(6)}"
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        with fs.open_input_stream(probe) as f:
            f.read()
        fs.delete_file(probe)
    except OSError as e:  # Arrow's S3 and local errors alike
        raise StoreError(f"run.root={root}: cannot write there: {str(e).strip()}{_endpoint_note(root)}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def check_input_file(key: str, uri: str, expected: str) -> None:
    """An input file (a local path, or on an object store: those are not checked at config load) exists, as
    seen from here. Otherwise a StoreError naming the key, what was expected and the endpoint asked."""
    try:
        fs, path = filesystem(uri)
        kind = fs.get_file_info(path).type
    except OSError as e:
        raise StoreError(f"{key}={uri}: cannot be read: {str(e).strip()}{_endpoint_note(uri)}") from e
    if kind != pafs.FileType.File:
        what = "a folder" if kind == pafs.FileType.Directory else "no such object" if "://" in uri else "no such file"
        raise StoreError(f"{key}={uri}: {what}; expected {expected}{_endpoint_note(uri)}")


def _endpoint_note(uri: str) -> str:
    if not uri.startswith("s3://"):
        return ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return (f" (endpoint {endpoint}, from run.endpoint_url or $AWS_ENDPOINT_URL)" if endpoint else
            " (AWS's own endpoint: for MinIO, Ceph or another S3-compatible store set run.endpoint_url)")


def write_text(uri: str, text: str) -> None:
    """`uri` replaced whole: a reader (or a resumed attempt) never sees it half written."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    _write_atomic(fs, path, text.encode())


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if not isinstance(fs, pafs.LocalFileSystem):  # an object PUT is atomic: readers see the old object or the new one
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def written_values(uri: str, column: str) -> set:
    """The `column` values of every Parquet file under `uri` (a resumed attempt's output folder), so the stage
    writes only the rows they lack. A file that cannot be read — cut off when its writer was killed, on a local
    disk (an object appears only once whole) — is deleted: its rows are written again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    values: set = set()
    for file in _parquet_files(fs, path):
        try:
            values.update(pq.read_table(file, filesystem=fs, columns=[column]).column(column).to_pylist())
        except (pa.ArrowInvalid, OSError):
            fs.delete_file(file)
    return values


def _parquet_files(fs, path: str) -> list[str]:
    return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")]


def resumed_rows(uri: str, stage: str, total: "int | Callable[[], int]", unit: str) -> frozenset:
    """The cand_ids a resumed attempt already wrote under `uri` (none in a fresh one), said on the console.
    `total` may be a function: counted only when there is something to say."""
    written = frozenset(written_values(uri, "cand_id"))
    if written:
        total = total() if callable(total) else total
        print(f"[scoder-ray] {stage}: {len(written)} of {total} {unit} already written; doing the other "
              f"{max(0, total - len(written))}", flush=True)
    return written


def write_table(uri: str, table) -> None:
    """One Parquet file at `uri` (a path ending in .parquet)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under a local path: a commit marker written after it never names
    data that a power cut could still take back."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _select(cfg: Config, dotted: str) -> Any:
    """`run.seed` -> cfg.run.seed; None where the key no longer exists."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node
