"""CPU engines claim their own cores (engine.pin_to_free_cores): real processes, real flocks."""
import json
import os
import signal
import subprocess
import sys
import time

CLAIM = ("import json, sys, os; from scoder_ray.generate.engine import pin_to_free_cores; "
         "cores = pin_to_free_cores(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])); "
         "print(json.dumps([cores, sorted(os.sched_getaffinity(0))]), flush=True); sys.stdin.read()")


def claim(n: int, lock_dir, wait_s: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(n), str(lock_dir), str(wait_s)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def answer(proc: subprocess.Popen) -> tuple[list[int], list[int]]:
    cores, affinity = json.loads(proc.stdout.readline())
    return cores, affinity


def release(proc: subprocess.Popen) -> None:
    proc.communicate("")


def test_engines_get_disjoint_cores_and_a_dead_engines_cores_come_back(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    first = claim(1, tmp_path)
    held, affinity = answer(first)
    assert held == affinity == [allowed[0]]  # pinned: vLLM binds its threads to exactly these

    everything = claim(len(allowed), tmp_path)
    assert answer(everything) == ([], allowed)  # none free within wait_s: unpinned rather than sharing a core
    release(everything)

    rest = claim(len(allowed) - 1, tmp_path) if len(allowed) > 1 else None
    if rest:
        assert answer(rest)[0] == allowed[1:]
        release(rest)

    # The next pool's engine waits for the cores of one still exiting; a killed process's locks are dropped.
    waiter = claim(len(allowed), tmp_path, wait_s=60)
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert answer(waiter) == (allowed, allowed)
    release(waiter)


def test_a_failed_engine_says_what_its_core_logged_and_the_free_memory(tmp_path):
    """vLLM's exception in the actor says only "see root cause above": the root cause is in the log file the
    engine core shares with the actor (a Ray worker's stderr). failure_context reads it from there."""
    log = tmp_path / "worker.err"
    log.write_text("INFO starting\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ValueError: Available memory on node 0 (0.4/23.5 GiB) on kv cache allocation is less than "
                   "requested\n"
                   "RuntimeError: Engine core initialization failed. See root cause above.\n")
    code = "from scoder_ray.generate.engine import failure_context; print(failure_context())"
    with open(log, "a") as err:
        said = subprocess.run([sys.executable, "-c", code], stderr=err, stdout=subprocess.PIPE, text=True,
                              check=True).stdout
    assert "its log: ValueError: Available memory on node 0" in said and "initialization failed" not in said
    assert "memory available on this node:" in said and " GiB" in said
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "its log" not in piped and "memory available" in piped  # stderr not a file: memory only


WATCH = ("import sys, threading, time, types; from scoder_ray.generate.sample import watch_engine_core; "
         "core = types.SimpleNamespace(resources=types.SimpleNamespace(engine_dead=False)); "
         "watch_engine_core(core, threading.Event(), every_s=0.05, grace_s=1.0); "
         "core.resources.engine_dead = True; time.sleep(float(sys.argv[1]))")


def test_a_dead_engine_core_replaces_an_idle_actor_but_not_one_that_is_ending():
    """The watcher's two cases, in real processes over a client whose dead mark is set (as vLLM's is when its
    core dies). An actor that lives on past the grace with a dead core ends with exit code 1 and says why (Ray
    restarts it); an actor that ends within the grace (Ray ends a finished pool's actor by killing its
    children, the core first, then the process) ends quietly: no false 'died' in the job's log."""
    idle = subprocess.run([sys.executable, "-c", WATCH, "30"], capture_output=True, text=True, timeout=60)
    assert idle.returncode == 1 and "engine core of this actor died: replacing the actor" in idle.stderr
    ending = subprocess.run([sys.executable, "-c", WATCH, "0.3"], capture_output=True, text=True, timeout=60)
    assert ending.returncode == 0 and "died" not in ending.stderr, ending.stderr
