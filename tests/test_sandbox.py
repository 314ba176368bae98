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
