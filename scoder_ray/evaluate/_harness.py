"""Runs inside the sandbox's child process (`python -I _harness.py`); standard library only.

Protocol: the parent writes one JSON object to stdin — nonce, solution, tests, limits, uid, result_fd —
and closes it. The harness isolates itself (network namespace, resource limits, an unprivileged uid),
runs the solution, then the tests, and only then writes `<nonce> passed` to the result pipe. Anything
else — an early exit, SystemExit, a crash, a killed harness, a closed or hijacked pipe — leaves no
passing message, so the parent records a failure. The nonce is never visible to the program as data
(it is read from stdin, which is then closed); a program that deliberately searches the harness's
memory for it is out of scope for a subprocess sandbox (use a VM for that threat).
"""
import builtins
import ctypes
import json
import os
import resource
import sys

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


def main() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Everything the verdict depends on is bound now, before any untrusted code runs.
    write, exit_now, fd = os.write, os._exit, int(spec["result_fd"])
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

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
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


if __name__ == "__main__":
    main()
