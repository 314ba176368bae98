"""The driver's console: scoder-ray's own lines, progress bars and warnings by default; with `--verbose`
everything Ray, Ray Data, Ray Train and vLLM print as well. Either way the whole output goes to
RUN_DIR/logs/driver-<UTC time>-<pid>.log (on an object-store root: uploaded after every stage and at exit); the
local scratch copy in the temp folder is removed at exit once the run directory has the log. A driver that was
killed cannot do that: the next driver of the same run on that machine uploads its scratch log whole (the lines
after its last copy are the ones that say how it ended) and removes it.

It works on file descriptors 1 and 2 (pipes read by a thread), so it also catches what Ray's log monitor
and C extensions write; the run's own code keeps printing as usual.
"""
from __future__ import annotations

import atexit
import glob
import json
import os
import re
import tempfile
import threading
import time
from typing import Optional

# Lines Ray forwards from its workers ("(MapWorker(MapBatches(Sampler)) pid=13048) ...", colour or not),
# and Ray's own INFO/DEBUG log records on the driver (Ray Data's progress blocks among them).
_WORKER = re.compile(r"^(?:\x1b\[[\d;]*m)?\(.*?pid=\d+")
_RAY_INFO = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:INFO|DEBUG)\b"  # Python records
                       r"|^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IW] \d+ \d+\]")  # Ray core's C++ (I, W)
# False alarms Ray prints at every pool, shown to the user as errors: (1) Ray core's "constructor
# arguments in the object store and max_restarts > 0 ... the actor restart will fail" (ray#53727) for Ray
# Data's actors, whose arguments (the operator's DataContext and transform refs) the operator holds for the
# pool's whole life, so a restart finds them; (2) the raylet's "Task X.__ray_terminate__ failed ... will be
# retried" for an actor ending as we asked (IntentionalSystemExit: kept engines released gracefully); (3) the
# GCS's "Failed to kill actor ... Socket closed": the actor's process was already gone, nothing was left to kill;
# (4) the driver's "Token authentication is enabled for this Ray cluster": what our clusters are meant to have.
_RAY_FALSE_ALARM = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\("
                              r".*has constructor arguments in the object store"
                              r"|^(?:\x1b\[[\d;]*m)?\(raylet\)(?:\x1b\[[\d;]*m)? Task \w+\.__ray_terminate__ failed\."
                              r".*IntentionalSystemExit"
                              r"|\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, .*Socket closed"
                              r"|WARNING authentication_token_setup\.py:\d+ -- Token authentication is enabled for this")
_ACTIVE: Optional["Console"] = None
SCRATCH = "scoder-ray-driver-"  # + <pid>-<random>.log in the temp folder; + .dest: the run it belongs to
_MARKER = b"\x00scoder-ray-console-stop\x00"


def noise(line: str) -> bool:
    """Whether the quiet console leaves `line` out (the log file keeps it). A worker's line of our own
    (`[scoder-ray] training resumes ...`) is for the user, and stays."""
    return bool((_WORKER.match(line) and "[scoder-ray]" not in line) or _RAY_INFO.match(line)
                or _RAY_FALSE_ALARM.search(line))


class Console:
    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.local = tempfile.NamedTemporaryFile("ab", prefix=f"{SCRATCH}{os.getpid()}-", suffix=".log", delete=False)
        self.name = f"driver-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        self.lock = threading.Lock()
        self.store = None
        self.saved: dict[int, tuple[int, threading.Event, int]] = {}

    def start(self) -> "Console":
        global _ACTIVE
        import sys

        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            read, write = os.pipe()
            saved, stopped = os.dup(fd), threading.Event()
            self.saved[fd] = (saved, stopped, os.fstat(write).st_ino)
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pump, args=(read, saved, stopped), daemon=True, name=f"console-{fd}").start()
        _ACTIVE = self
        atexit.register(self.stop)
        return self

    def _pump(self, read: int, out: int, stopped: threading.Event) -> None:
        """Copy everything to the log file; lines that are not noise (all, when verbose) to the console. A
        progress bar's carriage-return updates pass at once, not at the end of its line. After `stop()`'s
        marker, whatever still arrives (from processes that inherited the descriptor) goes straight out."""
        pending = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            if stopped.is_set():
                os.write(out, chunk)
                continue
            end = chunk.find(_MARKER)  # one write of fewer than PIPE_BUF bytes: never split by a read
            if end >= 0:
                chunk, after = chunk[:end], chunk[end + len(_MARKER):]
            with self.lock:
                self.local.write(chunk)
                self.local.flush()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            shown = [ln + b"\n" for ln in lines if self.verbose or not noise(ln.decode(errors="replace"))]
            if pending.endswith(b"\r") or (b"\r" in pending and not noise(pending.decode(errors="replace"))):
                shown.append(pending)
                pending = b""
            if end >= 0:
                shown.append(pending)
                shown.append(after)
                pending = b""
            if shown:
                os.write(out, b"".join(shown))
            if end >= 0:
                stopped.set()

    def attach(self, store) -> None:
        """From now on the log belongs to `store`'s run: RUN_DIR/logs/<name>."""
        if self.store is None:
            print(f"[scoder-ray] log: {store.file_uri('logs/' + self.name)}"
                  + ("" if self.verbose else "  (the console leaves out Ray's and vLLM's own lines: --verbose shows them)"),
                  flush=True)
        self.store = store
        with open(self.local.name + ".dest", "w") as f:  # whose log this is, should this driver be killed
            json.dump({**store.identity(), "name": self.name}, f)
        self.sync()
        recover_killed_logs(store)

    def sync(self) -> bool:
        """Copy the log so far to the run directory (the whole file, atomically); whether it was."""
        if self.store is None:
            return False
        with self.lock:
            self.local.flush()
            data = open(self.local.name, "rb").read()
        try:
            self.store.write_log(self.name, data)
        except OSError:  # a log that cannot be copied must not fail the run; the local file stays
            return False
        return True

    def stop(self) -> None:
        """Drain the pipes up to a marker, give the descriptors back, and copy the log a last time."""
        global _ACTIVE
        import sys

        if not self.saved:
            return
        for fd, (saved, stopped, pipe) in self.saved.items():
            (sys.stdout if fd == 1 else sys.stderr).flush()
            if os.fstat(fd).st_ino != pipe:  # someone else's descriptor now (a test harness's capture): leave it
                continue
            os.write(fd, _MARKER)
            stopped.wait(timeout=10)
            os.dup2(saved, fd)
        self.saved = {}
        copied = self.sync()
        self.local.close()
        _ACTIVE = None
        # The local copy is a scratch file: gone once the run directory has the log, kept (and named) where
        # it is the only one (no run directory yet, or a root that could not be written); an empty one holds nothing.
        if copied or not os.path.getsize(self.local.name):
            os.unlink(self.local.name)
            if os.path.exists(self.local.name + ".dest"):
                os.unlink(self.local.name + ".dest")
        elif os.path.getsize(self.local.name):
            sys.stderr.write(f"[scoder-ray] the driver's whole log is kept at {self.local.name}\n")


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (a killed one no parent has reaped yet is a zombie: not running)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def recover_killed_logs(store) -> list[str]:
    """Upload the scratch logs that killed drivers of `store`'s run left in this machine's temp folder (their
    copy in RUN_DIR/logs stops at their last completed stage) and remove them; returns the log names."""
    recovered, run = [], store.identity()
    for dest in glob.glob(os.path.join(tempfile.gettempdir(), f"{SCRATCH}*.log.dest")):
        log = dest[: -len(".dest")]
        try:
            pid = int(os.path.basename(log)[len(SCRATCH):].split("-", 1)[0])
            with open(dest) as f:
                owner = json.load(f)
        except (ValueError, OSError):
            continue
        if _alive(pid) or {k: owner.get(k) for k in run} != run:
            continue  # a driver still running, or another run's log: its own next driver takes it
        try:
            with open(log, "rb") as f:
                store.write_log(owner["name"], f.read())
        except OSError:
            continue
        for path in (log, dest):
            os.unlink(path)
        recovered.append(owner["name"])
        print(f"[scoder-ray] the log of a driver that was killed (pid {pid}) is whole again: "
              f"{store.file_uri('logs/' + owner['name'])}", flush=True)
    return recovered


def start(verbose: bool = False) -> Console:
    return Console(verbose).start()


def attach(store) -> None:
    """Send the active console's log (if any) to `store`'s run directory."""
    if _ACTIVE is not None:
        _ACTIVE.attach(store)


def sync() -> None:
    if _ACTIVE is not None:
        _ACTIVE.sync()
