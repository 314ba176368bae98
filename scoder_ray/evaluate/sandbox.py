"""The one place untrusted, model-written code runs: a child process with limits, no network, and a
verdict established by the harness, not by the program.

Each program (solution + test code) runs as `python -I -S _harness.py` in a fresh temporary directory that
is removed afterwards, with:
- resource limits: CPU seconds, address space, file size (which also caps captured output: stdout and
  stderr go to files in the sandbox directory), open files, processes, no core dumps;
- a wall-clock timeout that kills the whole process group;
- new network and PID namespaces (see `_harness.isolate`): no TCP/UDP even to loopback; the program
  sees no process outside its namespace, and every process it started dies with it, daemons too;
- when the parent runs as root (containers, CI): a per-run unprivileged uid, held exclusively through a
  lock file, so the program cannot delete or overwrite files it does not own, and the process limit
  counts its processes alone. Not root: the parent's own uid inside a user namespace, so the program
  could touch the user's files: prefer running evaluations as root inside a container;
- the verdict from a nonce-tagged message that the harness writes after the tests ran (see _harness).

Verdicts: `passed`, `failed` (an exception, a failed assertion, an early exit), `timeout` (wall clock
or CPU limit), `error` (killed by another limit — memory, file size — or the sandbox could not run).
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

HARNESS = str(Path(__file__).with_name("_harness.py"))
UID_BASE = int(os.environ.get("SCODER_SANDBOX_UID_BASE", "61000"))  # uids no account on the machine uses
UID_SLOTS = 1000
LOCK_DIR = Path(tempfile.gettempdir()) / "scoder-sandbox-uids"
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, whole run
    cpu_seconds: int = 10
    memory_mb: int = 2048  # address space
    file_size_mb: int = 16  # any file written, stdout/stderr included
    open_files: int = 128
    processes: int = 32  # per sandbox uid (as root); for the user otherwise
    output_cap: int = 4096  # bytes of stdout/stderr kept in the verdict
    site_packages: bool = False  # stdlib only (`python -I -S`, 15 ms faster a start); True for numpy & co.


@dataclass
class Verdict:
    status: str  # passed | failed | timeout | error
    reason: str = ""
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return asdict(self)


def run_program(solution: str, tests: str, limits: Limits = Limits()) -> Verdict:
    """Run `solution` then `tests` (code that raises on failure) in the sandbox."""
    start = time.monotonic()
    with _uid_slot() as uid, _sandbox_dir(uid) as workdir:
        out_path, err_path = Path(workdir) / ".stdout", Path(workdir) / ".stderr"
        read_fd, write_fd = os.pipe()
        nonce = secrets.token_hex(16)
        spec = {"nonce": nonce, "solution": solution, "tests": tests, "uid": uid, "result_fd": write_fd,
                "keep_read_search": KEEP_READ_SEARCH and uid is not None,
                "limits": {"cpu_seconds": max(1, int(limits.cpu_seconds)), "memory_mb": limits.memory_mb,
                           "file_size_mb": limits.file_size_mb, "open_files": limits.open_files,
                           "processes": limits.processes}}
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", *([] if limits.site_packages else ["-S"]), HARNESS], stdin=subprocess.PIPE, stdout=out, stderr=err,
                    cwd=workdir, env={**CHILD_ENV, "HOME": workdir, "TMPDIR": workdir},
                    pass_fds=(write_fd,), start_new_session=True,
                )
            finally:
                os.close(write_fd)
            try:
                proc.stdin.write(json.dumps(spec).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_all(proc.pid)
            proc.wait()
        message = _read_result(read_fd, nonce)
        verdict = _judge(message, proc.returncode, timed_out, limits)
        verdict.stdout = _head(out_path, limits.output_cap)
        verdict.stderr = _head(err_path, limits.output_cap)
    verdict.seconds = round(time.monotonic() - start, 4)
    return verdict


def run_batch(pairs: Sequence[tuple[str, str]], limits: Limits = Limits(), workers: int = 2,
              progress: bool = False) -> list[Verdict]:
    """Run many (solution, tests) pairs on a bounded pool; one runaway never stalls the others beyond
    its own timeout. Results come back in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_program, s, t, limits) for s, t in pairs]
        if progress:
            from tqdm import tqdm

            for _ in tqdm(futures, total=len(futures), desc="sandbox", unit="prog"):
                _.result()
        return [f.result() for f in futures]


# -- internals --------------------------------------------------------------------------------------
def _judge(message: Optional[str], returncode: int, timed_out: bool, limits: Limits) -> Verdict:
    if message is not None:
        status, _, reason = message.partition(" ")
        return Verdict(status if status in ("passed", "failed", "error") else "error", reason)
    if timed_out:
        return Verdict("timeout", f"exceeded {limits.timeout_s:g}s wall clock")
    if returncode < 0 or returncode > 128:  # > 128: the harness passes on its namespace's death signal
        sig = -returncode if returncode < 0 else returncode - 128
        if sig == signal.SIGXCPU:
            return Verdict("timeout", f"exceeded {limits.cpu_seconds}s CPU")
        if sig == signal.SIGXFSZ:
            return Verdict("error", f"file size limit ({limits.file_size_mb} MB, output included)")
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return Verdict("error", f"killed by {name}")
    if returncode == 0:
        return Verdict("failed", "exited before the tests completed")
    return Verdict("failed", f"exit code {returncode} before the tests completed")


def _read_result(fd: int, nonce: str) -> Optional[str]:
    """The harness's message, if any. Non-blocking: a writer that escaped cannot hang us."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                break
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    data = b"".join(chunks)
    tag = nonce.encode() + b" "
    at = data.rfind(tag)
    if at < 0:
        return None
    return data[at + len(tag):].split(b"\n", 1)[0].decode("utf-8", "replace")


def _kill_all(pid: int) -> None:
    """Kill the harness's process group; the PID namespace takes everything else down with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _private_path(paths: Sequence[str]) -> bool:
    """Whether any of these paths sits below a directory others may not enter (e.g. pyenv in /root)."""
    for path in paths:
        p = Path(path).resolve()
        for d in [p, *p.parents]:
            if d.is_dir() and not d.stat().st_mode & stat.S_IXOTH:
                return True
    return False


# The sandbox uid must read the interpreter and its packages; where they are private, it keeps
# CAP_DAC_READ_SEARCH (read-only; see _harness.drop_privileges).
KEEP_READ_SEARCH = _private_path([sys.base_prefix, sys.prefix, HARNESS])


@contextmanager
def _uid_slot() -> Iterator[Optional[int]]:
    """An unprivileged uid no other sandbox uses right now (cross-process, through a lock file)."""
    if os.geteuid() != 0:
        yield None
        return
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
        f = open(LOCK_DIR / f"{uid}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        try:
            yield uid
        finally:
            f.close()
        return
    raise RuntimeError(f"all {UID_SLOTS} sandbox uids from {UID_BASE} are in use")


@contextmanager
def _sandbox_dir(uid: Optional[int]) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="scoder-sbx-")
    try:
        if uid is not None:
            os.chown(path, uid, uid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _head(path: Path, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
    except OSError:
        return ""
