"""The one place untrusted, model-written code runs: a child process with limits, no network, and a
verdict established by the harness, not by the program.

Each program (solution + test code) runs in a child forked from a warm fork server (`_harness.py`, one
per worker, started as `python -I -S`), in a fresh temporary directory that is removed afterwards, with:
- resource limits: CPU seconds, address space, file size (which also caps captured output: stdout and
  stderr go to files in the sandbox directory), open files, processes, no core dumps; memory and processes
  also for the run's processes together, through a cgroup per run where one can be made
  (`_harness.RunCgroup`; `Verdict.extra["limits"]` says which applied);
- a wall-clock timeout that kills the whole process group (and the PID namespace with it);
- new network, PID and mount namespaces (see `_harness.isolate`, `_harness.private_mounts`): no TCP/UDP
  even to loopback; the program sees no process outside its namespace, and every process it started dies
  with it, daemons too; a fresh /proc, an empty /sys, and fresh /tmp, /var/tmp and /dev/shm per run
  (nothing persists or is shared between runs); output files opened by the server before the program
  runs and read back through those descriptors, never by path;
- when the parent runs as root (containers, CI): a per-run unprivileged uid with no capability, held
  exclusively through a lock file, so the program cannot read root-only files (/etc/shadow, /root: a
  private directory holding the interpreter is replaced by one with the interpreter's folders alone,
  bound read-only), delete or overwrite files it does not own, and the process limit counts its
  processes alone. Not root: the parent's own uid inside a user namespace, with the user's home
  replaced by an empty directory (the interpreter's folders under it bound back read-only); files the
  user can read elsewhere stay readable: prefer running evaluations as root inside a container;
- isolation that fails closed: where the namespaces or mounts are refused (a container's default seccomp
  profile, a kernel without unprivileged user namespaces) every run raises `SandboxUnavailable`, naming
  the refusal, unless `isolation="none"` (config `evaluate.isolation: none`) accepts running without;
- the verdict from a nonce-tagged message that the harness writes after the tests ran (see _harness).

Verdicts: `passed`, `failed` (an exception, a failed assertion, an early exit), `timeout` (wall clock
or CPU limit), `error` (killed by another limit — memory, file size — or the sandbox could not run).
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import secrets
import select
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from scoder_ray.evaluate.checks import CheckedTests, decode, judge

HARNESS = str(Path(__file__).with_name("_harness.py"))
UID_BASE = int(os.environ.get("SCODER_SANDBOX_UID_BASE", "61000"))  # uids no account on the machine uses
UID_SLOTS = 1000
LOCK_DIR = Path(tempfile.gettempdir()) / "scoder-sandbox-uids"
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class SandboxUnavailable(RuntimeError):
    """The isolation asked for cannot be had on this machine."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, whole run
    cpu_seconds: int = 10
    memory_mb: int = 2048  # address space
    file_size_mb: int = 16  # any file written, stdout/stderr included
    open_files: int = 128
    processes: int = 32  # per sandbox uid (as root); for the user otherwise
    output_cap: int = 4096  # bytes of stdout/stderr kept in the verdict


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


class Sandbox:
    """A pool of fork servers (one per worker), thread-safe; keep one alive to amortise start-up.

    `site_packages=False` runs the servers as `python -I -S` (standard library only, as HumanEval and
    MBPP need); True lets programs import what the evaluator's environment has (numpy & co.). `hide`:
    files and folders that read as empty inside every run (a benchmark's tests: the answer key).
    """

    def __init__(self, workers: int = 2, site_packages: bool = False, isolation: str = "full",
                 hide: Sequence[str] = ()):
        if isolation not in ("full", "none"):
            raise ValueError(f"isolation={isolation!r}: expected 'full' or 'none'")
        if isolation == "none":
            import logging

            logging.getLogger(__name__).warning(
                "sandbox isolation is OFF (evaluate.isolation=none): model-written code runs without network, "
                "PID or mount namespaces; it can reach the network and this machine's files")
        self.site_packages, self.isolation = site_packages, isolation
        self.hide = list(hide)  # files and folders the programs must not read (e.g. the benchmark's answer key)
        self._idle: "queue.Queue[subprocess.Popen]" = queue.Queue()
        self._all: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        for _ in range(max(1, workers)):
            self._idle.put(self._start_server())
        self.workers = max(1, workers)

    def _start_server(self) -> subprocess.Popen:
        flags = ["-I"] if self.site_packages else ["-I", "-S"]
        server = subprocess.Popen([sys.executable, *flags, HARNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=CHILD_ENV, start_new_session=True)
        with self._lock:
            self._all.append(server)
        return server

    def run(self, solution: str, tests: "str | CheckedTests", limits: Limits = Limits()) -> Verdict:
        """Run `solution` then `tests`: code that raises on failure (decided in the program's process), or
        checks whose values the program reports and this process judges (`checks.py`)."""
        checked = isinstance(tests, CheckedTests)
        server = self._idle.get()
        try:
            with _uid_slot() as uid:
                spec = {"nonce": secrets.token_hex(16), "solution": solution, "tests": "" if checked else tests, "uid": uid,
                        "keep_read_search": KEEP_READ_SEARCH and uid is not None, "readable": READABLE,
                        "hide": (HIDE if uid is None else []) + self.hide,
                        "isolation": self.isolation, "env": CHILD_ENV,
                        "timeout_s": limits.timeout_s, "output_cap": limits.output_cap,
                        "limits": {"cpu_seconds": max(1, int(limits.cpu_seconds)), "memory_mb": limits.memory_mb,
                                   "file_size_mb": limits.file_size_mb, "open_files": limits.open_files,
                                   "processes": limits.processes}}
                if checked:
                    spec.update(calls=[c.expr for c in tests.checks], entry_point=tests.entry_point, inputs=tests.inputs)
                answer = _ask(server, spec, limits.timeout_s + 30)
        except (OSError, ValueError, TimeoutError) as e:  # the server itself broke: replace it
            _stop(server)
            server = self._start_server()
            return Verdict("error", f"sandbox server failed: {e}")
        finally:
            self._idle.put(server)
        if "fault" in answer:
            return Verdict("error", f"sandbox fault: {answer['fault']}")
        verdict = _judge(answer["message"], answer["returncode"], answer["timed_out"], limits)
        if answer.get("out_of_memory") and verdict.status != "passed":
            verdict = Verdict("error", f"memory limit ({limits.memory_mb} MB for the run's processes together)")
        if verdict.status == "error" and verdict.reason.startswith("isolation unavailable"):
            raise SandboxUnavailable(f"sandbox {verdict.reason}. Evaluation stops rather than run model-written "
                                     "code unconfined; evaluate.isolation=none accepts running without isolation")
        if checked and verdict.passed:  # the program ran to its end: now the verdict is ours to make
            try:
                values = json.loads(answer.get("values") or "null")
            except ValueError:
                values = None
            ok, reason = judge(tests, values) if isinstance(values, list) else (False, "no values reported")
            verdict = Verdict("passed" if ok else "failed", reason)
            if ok and any(c.op == "record" for c in tests.checks):
                verdict.extra["values"] = [decode(v["value"]) for v in values]
        verdict.extra["decided"] = "outside" if checked else "in-process"
        verdict.extra["limits"] = answer.get("limits", "")
        verdict.seconds = round(answer["seconds"], 4)
        verdict.stdout, verdict.stderr = answer["stdout"], answer["stderr"]
        return verdict

    def run_batch(self, pairs: Sequence[tuple[str, "str | CheckedTests"]], limits: Limits = Limits(),
                  progress: bool = False) -> list[Verdict]:
        """Many (solution, tests) pairs, `workers` at a time, results in input order. One runaway holds
        one worker for its own timeout and never stalls the others."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self.run, s, t, limits) for s, t in pairs]
            if progress:
                from tqdm import tqdm

                for f in tqdm(futures, total=len(futures), desc="sandbox", unit="prog"):
                    f.result()
            return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            servers, self._all = self._all, []
        for server in servers:
            _stop(server)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_program(solution: str, tests: "str | CheckedTests", limits: Limits = Limits()) -> Verdict:
    """One program in a one-off sandbox (start-up included; keep a `Sandbox` for many)."""
    with Sandbox(workers=1) as sandbox:
        return sandbox.run(solution, tests, limits)


def check_isolation(isolation: str = "full") -> None:
    """Raise SandboxUnavailable now where this machine cannot isolate model-written code (`isolation="full"`):
    a run checks it before any work, not when its first teacher samples reach the sandbox."""
    if isolation == "none":
        return
    try:
        with Sandbox(workers=1) as sandbox:
            sandbox.run("x = 1\n", "assert x == 1\n", Limits(timeout_s=60, cpu_seconds=10))
    except SandboxUnavailable as e:
        import socket

        raise SandboxUnavailable(
            f"checked before any work on {socket.gethostname()}: {e}. In a container the runtime's default seccomp "
            "and AppArmor profiles refuse the namespaces and mounts: cluster/kuberay.yaml sets both to Unconfined "
            "for the Ray containers (they still run as a user without capabilities)") from None


def run_batch(pairs: Sequence[tuple[str, "str | CheckedTests"]], limits: Limits = Limits(), workers: int = 2,
              progress: bool = False, isolation: str = "full") -> list[Verdict]:
    with Sandbox(workers=workers, isolation=isolation) as sandbox:
        return sandbox.run_batch(pairs, limits, progress)


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


def _private_path(paths: Sequence[str]) -> bool:
    """Whether any of these paths sits below a directory others may not enter (e.g. pyenv in /root)."""
    for path in paths:
        p = Path(path).resolve()
        for d in [p, *p.parents]:
            if d.is_dir() and not d.stat().st_mode & stat.S_IXOTH:
                return True
    return False


# The sandbox uid must read the interpreter and its packages: inside the mount namespace these folders
# are bound read-only where a private directory hides them. Only without one (isolation none) does it
# keep CAP_DAC_READ_SEARCH instead (read-only; see _harness.drop_privileges).
READABLE = sorted({sys.base_prefix, sys.prefix, os.path.dirname(HARNESS)})
KEEP_READ_SEARCH = _private_path(READABLE)
# Not root, the program runs as the evaluating user: that user's home is replaced by an empty directory
# (the interpreter's folders under it bound back read-only), so its keys and files are out of reach.
HIDE = [os.path.expanduser("~")] if os.geteuid() != 0 else []


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


def _ask(server: subprocess.Popen, spec: dict, timeout: float) -> dict:
    """Send one run, read its answer; every byte of the answer within the deadline."""

    data = json.dumps(spec).encode()
    server.stdin.write(struct.pack("!I", len(data)) + data)
    server.stdin.flush()
    deadline = time.monotonic() + timeout
    fd = server.stdout.fileno()

    def read_exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no complete answer in {timeout:.0f}s")
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise OSError("sandbox server exited")
            out += chunk
        return out

    return json.loads(read_exactly(struct.unpack("!I", read_exactly(4))[0]))


def _stop(server: subprocess.Popen) -> None:
    try:
        server.stdin.close()
        server.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        server.kill()
        server.wait()
