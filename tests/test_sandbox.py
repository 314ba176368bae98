"""The sandbox against hostile programs: each gets its expected verdict, and the harness and the machine
are unharmed afterwards (no leftover processes or files, the evaluator alive, other programs unaffected)."""
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from scoder_ray.evaluate.sandbox import UID_BASE, UID_SLOTS, Limits, run_batch, run_program

FAST = Limits(timeout_s=3, cpu_seconds=3)
ROOT_HOME = os.path.expanduser("~root")  # root's home, wherever this system puts it
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="file and process protection need the per-run uid (root)")


def sandbox_processes() -> list[int]:
    """Processes still running under any sandbox uid."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if UID_BASE <= d.stat().st_uid < UID_BASE + UID_SLOTS:
                    pids.append(int(d.name))
            except FileNotFoundError:
                pass
    return pids


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("scoder-sbx-*")}


@pytest.fixture(autouse=True)
def machine_unharmed():
    before = sandbox_dirs()
    yield
    deadline = time.time() + 5
    while sandbox_processes() and time.time() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == [], "a sandboxed process outlived its run"
    assert sandbox_dirs() <= before, "a sandbox directory was left behind"


def test_correct_and_wrong_programs():
    assert run_program("def f(x):\n    return x + 1\n", "assert f(1) == 2\n", FAST).status == "passed"
    v = run_program("def f(x):\n    return x\n", "assert f(1) == 2, 'f(1) should be 2'\n", FAST)
    assert (v.status, v.reason) == ("failed", "AssertionError: f(1) should be 2")
    v = run_program("def f(x):\n    return 1 / 0\n", "f(1)\n", FAST)
    assert v.status == "failed" and "ZeroDivisionError" in v.reason
    v = run_program("def f(x)\n    return x\n", "pass\n", FAST)
    assert v.status == "failed" and "SyntaxError" in v.reason


def test_infinite_loop_times_out_on_the_wall_clock():
    start = time.monotonic()
    v = run_program("while True:\n    pass\n", "pass\n", FAST)
    assert v.status == "timeout" and time.monotonic() - start < FAST.timeout_s + 2


def test_sleeping_program_times_out_without_cpu():
    v = run_program("import time\ntime.sleep(60)\n", "pass\n", Limits(timeout_s=1, cpu_seconds=30))
    assert v.status == "timeout" and v.seconds < 3


def test_cpu_limit_stops_a_busy_program():
    v = run_program("while True:\n    pass\n", "pass\n", Limits(timeout_s=30, cpu_seconds=1))
    assert v.status == "timeout" and "CPU" in v.reason and v.seconds < 5


def test_fork_bomb_is_contained_and_others_keep_running():
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", "pass\n")
    ok = ("def f():\n    return 1\n", "assert f() == 1\n")
    start = time.monotonic()
    verdicts = run_batch([bomb, ok, ok, ok, ok], FAST, workers=2)
    assert verdicts[0].status in ("timeout", "failed", "error") and not verdicts[0].passed
    assert [v.status for v in verdicts[1:]] == ["passed"] * 4
    assert max(v.seconds for v in verdicts[1:]) < 2.0  # the runaway did not stall its neighbours
    assert time.monotonic() - start < FAST.timeout_s + 5


def test_daemon_left_behind_is_killed():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n    os._exit(0)\n")
    assert run_program(code, "pass\n", FAST).status == "passed"  # the autouse fixture checks it is gone


def test_memory_bomb_is_stopped():
    v = run_program("x = bytearray(8 * 2**30)\n", "pass\n", Limits(timeout_s=5, memory_mb=512))
    assert v.status in ("failed", "error") and "MemoryError" in v.reason
    v = run_program("x = []\nwhile True:\n    x.append(' ' * 2**20)\n", "pass\n", Limits(timeout_s=10, memory_mb=512))
    assert not v.passed and v.status in ("failed", "error")


def test_a_gigabyte_of_output_is_capped():
    code = "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n"
    v = run_program(code, "pass\n", Limits(timeout_s=10, file_size_mb=16, output_cap=1000))
    assert not v.passed and "File too large" in v.reason or "file size" in v.reason
    assert len(v.stdout) <= 1000


def test_writing_a_large_file_is_capped():
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * 2**20)\n"
    v = run_program(code, "pass\n", Limits(timeout_s=10, file_size_mb=16))
    assert not v.passed and ("File too large" in v.reason or "file size" in v.reason)


@root_only
def test_cannot_delete_or_write_files_outside_its_directory(tmp_path):
    victim = tmp_path / "keep" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("data")
    code = (f"import os, shutil\nfor f in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(victim.parent)!r}),\n"
            f"          lambda: open({str(victim)!r}, 'w').write('gone')):\n"
            "    try:\n        f()\n    except OSError:\n        pass\n")
    v = run_program(code, "pass\n", FAST)
    assert v.status == "passed" and victim.read_text() == "data"
    assert run_program(f"import os\nos.remove({str(victim)!r})\n", "pass\n", FAST).status == "failed"


def test_no_network_even_to_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
    v = run_program(code, "pass\n", FAST)
    assert v.status == "failed" and ("unreachable" in v.reason or "OSError" in v.reason)
    time.sleep(0.2)
    server.close()
    assert accepted in ([], [None])


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_cannot_kill_the_evaluator_or_its_harness():
    me = os.getpid()
    code = (f"import os, signal\nfor pid in ({me}, os.getppid(), 1, -1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "def f():\n    return 7\n")
    v = run_program(code, "assert f() == 7\n", FAST)
    assert v.status == "passed"  # the harness survived to report, and so did we
    assert os.getpid() == me


@pytest.mark.parametrize("code", [
    "import os\nos._exit(0)\n",
    "raise SystemExit(0)\n",
    "import sys\nsys.exit()\n",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
])
def test_early_exit_does_not_pass(code):
    v = run_program(code, "assert False, 'tests ran'\n", FAST)
    assert v.status in ("failed", "error") and "tests ran" not in v.reason


def test_printing_success_or_forging_the_result_channel_does_not_pass():
    code = ("import os\nprint('passed')\nprint('All tests passed!')\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, b'passed\\n' * 3)\n    except OSError:\n        pass\n")
    v = run_program(code, "assert False\n", FAST)
    assert v.status == "failed" and "passed" in v.stdout


@pytest.mark.parametrize("code", [
    "import builtins\nclass Nope(Exception):\n    pass\nbuiltins.AssertionError = Nope\n",
    "import builtins\nbuiltins.print = lambda *a, **k: None\nbuiltins.Exception = BaseException\n",
    "import builtins\nbuiltins.__import__ = lambda *a, **k: None\n",
    "import sys\nsys.settrace(lambda *a: None)\n",
])
def test_overriding_builtins_does_not_pass(code):
    v = run_program(code, "import math\nassert math.floor(2.5) == 3\n", FAST)
    assert v.status == "failed" and "AssertionError" in v.reason


def test_sys_modules_tampering_is_undone_before_the_tests():
    code = ("import sys, types\nfake = types.ModuleType('math')\nfake.floor = lambda x: 99\n"
            "sys.modules['math'] = fake\nimport json\nsys.modules['json'] = fake\n")
    v = run_program(code, "import math\nassert math.floor(2.5) == 99\n", FAST)
    assert v.status == "failed"
    v = run_program(code, "import math, json\nassert math.floor(2.5) == 2 and json.dumps(1) == '1'\n", FAST)
    assert v.status == "passed"


def test_replacing_the_test_code_does_not_pass():
    code = ("def check(candidate):\n    pass\n"
            "def add(a, b):\n    return 0\n"
            "import scoder_ray\n")  # not importable in the sandbox (-I -S): the harness is not reachable
    tests = "def check(candidate):\n    assert candidate(1, 2) == 3\ncheck(add)\n"
    assert run_program(code, tests, FAST).status == "failed"
    code = "def check(candidate):\n    pass\ndef add(a, b):\n    return 0\n"
    assert run_program(code, tests, FAST).status == "failed"


@root_only
def test_root_only_host_files_are_not_readable_nor_sent_out(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-41")
    secret.chmod(0o600)
    code = ("import glob, os\nfound = []\n"
            f"for path in ['/etc/shadow', {str(secret)!r}] + glob.glob({ROOT_HOME!r} + '/*'):\n"
            "    try:\n        found.append(open(path).read()[:50])\n    except OSError:\n        pass\n"
            "print(found)\nraise ValueError(repr(found))\n")
    v = run_program(code, "pass\n", FAST)
    assert v.status == "failed" and "TOPSECRET" not in v.reason + v.stdout and "root:" not in v.reason + v.stdout
    # The interpreter's folders stay importable although they live under a private /root here.
    assert run_program("import json, decimal, email.utils\n", "pass\n", FAST).status == "passed"


@root_only
@pytest.mark.parametrize("trap", ["symlink", "fifo"])
def test_output_files_the_program_replaces_are_not_read_by_path(tmp_path, trap):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-42")
    secret.chmod(0o600)
    make = (f"os.symlink({str(secret)!r}, p)" if trap == "symlink" else "os.mkfifo(p)")
    code = ("import glob, os\nprint('hello')\n"
            "for p in ['.stdout', '.stderr', '/tmp/.stdout'] + glob.glob('/tmp/scoder-sbx-*/.std*'):\n"
            "    try:\n        os.remove(p)\n    except OSError:\n        pass\n"
            f"    try:\n        {make}\n    except OSError:\n        pass\n")
    started = time.time()
    v = run_program(code, "pass\n", FAST)
    assert v.status == "passed" and v.stdout == "hello\n" and "TOPSECRET" not in v.stdout + v.stderr
    assert time.time() - started < 15  # a FIFO does not hang the server


def test_scratch_places_and_proc_are_private_to_each_run():
    write = ("import os\nfor d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
             "    open(os.path.join(d, 'scoder-left-behind'), 'w').write('x')\n")
    assert run_program(write, "pass\n", FAST).status == "passed"
    check = ("import os\nseen = [d for d in ('/tmp', '/var/tmp', '/dev/shm') "
             "if os.path.exists(os.path.join(d, 'scoder-left-behind'))]\n"
             "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n")
    v = run_program(check, "assert seen == [], seen\nassert len(pids) <= 3, pids\n", FAST)
    assert v.status == "passed", v.reason
    assert not any(os.path.exists(os.path.join(d, "scoder-left-behind")) for d in ("/tmp", "/var/tmp", "/dev/shm"))
    # /proc shows the namespace's processes only: not this test's.
    v = run_program(f"import os\nvisible = os.path.exists('/proc/{os.getpid()}/environ')\n", "assert not visible\n", FAST)
    assert v.status == "passed"


REFUSE_UNSHARE = r'''
import ctypes, json, sys
from scoder_ray.evaluate.sandbox import Limits, SandboxUnavailable, run_program

class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

# seccomp: unshare (x86-64 syscall 272) fails with EPERM, as under a container's default profile.
insns = (Insn * 4)(Insn(0x20, 0, 0, 0), Insn(0x15, 0, 1, 272), Insn(0x06, 0, 0, 0x00050000 | 1),
                   Insn(0x06, 0, 0, 0x7FFF0000))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(Prog(4, insns)), 0, 0) == 0
limits = Limits(timeout_s=5, cpu_seconds=3)
try:
    run_program("x = 1\n", "assert x == 1\n", limits)
    print(json.dumps({"full": "ran"}))
except SandboxUnavailable as e:
    from scoder_ray.evaluate.sandbox import Sandbox
    with Sandbox(workers=1, isolation="none") as box:
        print(json.dumps({"full": str(e), "none": box.run("x = 1\n", "assert x == 1\n", limits).status}))
'''


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter names x86-64's unshare")
def test_refused_namespaces_stop_evaluation_with_a_clear_error():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", REFUSE_UNSHARE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "unshare(" in result["full"] and "Operation not permitted" in result["full"]
    assert "evaluate.isolation=none" in result["full"]
    assert result["none"] == "passed"  # accepted weaker isolation runs, with a warning
    assert "isolation is OFF" in out.stderr


REFUSED_RUN = REFUSE_UNSHARE.split("limits = Limits")[0] + """
from scoder_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter names x86-64's unshare")
def test_a_run_where_the_sandbox_cannot_isolate_stops_before_any_work(tmp_path):
    """`scoder-ray run` on a machine that refuses the sandbox's namespaces (a container's default seccomp
    profile): one line naming the refusal and what to change, before Ray, the teacher or the run store."""
    import subprocess
    import sys

    root = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", REFUSED_RUN, "run", "--preset", "tiny", f"run.root={root}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("scoder-ray: error:"))
    assert "checked before any work" in error and "unshare(" in error and "Operation not permitted" in error, error
    assert "cluster/kuberay.yaml" in error and "evaluate.isolation=none" in error, error
    assert not root.exists()  # no run directory, no stage begun
    # evaluate.isolation=none accepts running unconfined: the run goes on to its next check (a teacher that
    # does not answer, still before any work)
    proc = subprocess.run([sys.executable, "-c", REFUSED_RUN, "run", "--preset", "tiny", f"run.root={root}",
                           "evaluate.isolation=none", "teacher.samples_file=", "teacher.base_url=http://127.0.0.1:9/v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checked before any work" not in proc.stderr, proc.stderr[-2000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("scoder-ray: error:"))
    assert "teacher at http://127.0.0.1:9/v1 is not reachable" in error and not root.exists(), error


def test_the_evaluators_packages_stay_importable_read_only():
    from scoder_ray.evaluate.sandbox import Sandbox

    code = ("import numpy, os, sys\nwritable = os.access(os.path.dirname(numpy.__file__), os.W_OK)\n"
            "try:\n    open(os.path.join(sys.prefix, 'planted.py'), 'w').write('x')\n    planted = True\n"
            "except OSError:\n    planted = False\n")
    with Sandbox(workers=1, site_packages=True) as box:
        v = box.run(code, "assert numpy.arange(3).sum() == 3 and not writable and not planted\n", FAST)
    assert v.status == "passed", v.reason


def test_memory_is_limited_for_the_runs_processes_together():
    """Four children of 300 MB each stay under a 512 MB per-process limit; together they do not."""
    code = ("import os, time\npids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        x = bytearray(300 * 2**20)\n        for j in range(0, len(x), 4096):\n            x[j] = 1\n"
            "        time.sleep(1)\n        os._exit(0)\n    pids.append(pid)\n"
            "for p in pids:\n    assert os.waitpid(p, 0)[1] == 0\n")
    v = run_program(code, "pass\n", Limits(timeout_s=20, cpu_seconds=20, memory_mb=512))
    if not v.extra["limits"].startswith("cgroup"):
        pytest.skip(f"no cgroup on this machine: {v.extra['limits']}")
    assert (v.status, v.reason) == ("error", "memory limit (512 MB for the run's processes together)")
    alone = run_program(code.replace("range(4)", "range(1)"), "pass\n", Limits(timeout_s=20, cpu_seconds=20, memory_mb=512))
    assert alone.passed, alone
    assert not [d for d in Path("/sys/fs/cgroup").glob("*/**/scoder-sbx-*")], "a run's cgroup was left behind"


NOBODY = 65534
AS_NOBODY = """
import json, sys
from scoder_ray.evaluate.checks import from_asserts
from scoder_ray.evaluate.sandbox import Limits, Sandbox
programs = json.loads(sys.argv[1])
with Sandbox(workers=1) as box:
    out = [box.run(p["code"], from_asserts(p["tests"], "") if p["checked"] else p["tests"], Limits(timeout_s=5)).as_dict()
           for p in programs]
print(json.dumps(out))
"""


@root_only
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3") or not os.access("/home", os.W_OK),
                    reason="needs the OS Python and a writable /home to act as an unprivileged user with a home")
def test_an_unprivileged_evaluator_gets_the_same_guarantees():
    """Run by an ordinary user (the sandbox then uses a user namespace) with no capability left to gain and
    no_new_privs set, as cluster/kuberay.yaml runs the Ray containers (`capabilities: drop: [ALL]`,
    `allowPrivilegeEscalation: false`): that user's home is out of reach, scratch places are private, and
    verdicts decided outside cannot be forged."""
    import json
    import shutil
    import subprocess

    home = tempfile.mkdtemp(dir="/home", prefix="sbx-user-")
    try:
        code_dir = Path(home) / "code"  # the package under the home: it must stay importable, read-only
        shutil.copytree(Path(__file__).resolve().parents[1] / "scoder_ray" / "evaluate", code_dir / "scoder_ray" / "evaluate",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (code_dir / "scoder_ray" / "__init__.py").write_text("")
        (Path(home) / ".token").write_text("s3cr3t")
        for p in [Path(home), *Path(home).rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        os.chmod(home, 0o755)  # a home others may enter (Debian's default): only the hiding keeps it out
        os.chmod(Path(home) / ".token", 0o600)
        forge = ("import sys\ndef f():\n    fr = sys._getframe(1)\n    while fr:\n        r = fr.f_locals.get('report')\n"
                 "        if callable(r):\n            r('passed')\n        fr = fr.f_back\n    return 0\n")
        programs = [
            {"code": f"print(open({home + '/.token'!r}).read())\n", "tests": "pass\n", "checked": False},
            {"code": f"import os\nprint(sorted(os.listdir({home!r})))\n", "tests": "pass\n", "checked": False},
            {"code": "open('/tmp/left', 'w').write('x')\nopen('/dev/shm/left', 'w').write('x')\n", "tests": "pass\n", "checked": False},
            {"code": "import os\nprint(os.path.exists('/tmp/left'), os.path.exists('/dev/shm/left'))\n", "tests": "pass\n", "checked": False},
            {"code": forge, "tests": "assert f() == 1\n", "checked": True},
            {"code": forge, "tests": "assert f() == 1\n", "checked": False},
        ]
        proc = subprocess.run(["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                               "/usr/bin/python3", "-c", AS_NOBODY, json.dumps(programs)],
                              cwd="/", env={"HOME": home, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(code_dir)},
                              capture_output=True, text=True, timeout=120)
        if proc.returncode and "SandboxUnavailable" in proc.stderr:
            pytest.skip(f"no user namespaces for an ordinary user here: {proc.stderr.splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
        token, listing, write, persisted, forged_outside, forged_inside = (
            (v["status"], v["stdout"].strip(), v) for v in json.loads(proc.stdout.splitlines()[-1]))
        assert token[0] == "failed" and "s3cr3t" not in json.dumps(token[2])
        assert listing[:2] == ("passed", "['code']")  # the package, bound back read-only; nothing else
        assert write[0] == "passed" and persisted[:2] == ("passed", "False False")
        assert forged_inside[0] == "passed" and forged_outside[0] == "failed"  # the forgery works only in-process
    finally:
        shutil.rmtree(home, ignore_errors=True)
