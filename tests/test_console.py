"""The driver's console: quiet by default, everything with --verbose, the whole output in RUN_DIR/logs/."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

DRIVER = textwrap.dedent(r"""
    import subprocess, sys, time
    from scoder_ray import console
    from scoder_ray.store import RunStore

    console.start(verbose=sys.argv[2] == "verbose")
    console.attach(RunStore(sys.argv[1], "r"))
    print("[scoder-ray] [1/2] seeds ...", flush=True)
    print("\x1b[36m(MapWorker(MapBatches(Sampler)) pid=13048)\x1b[0m INFO 12-05 [core.py:133] Initializing an engine", flush=True)
    print("(RayTrainWorker pid=77) [scoder-ray] training resumes after step 4 of 8 from s3://b/x", flush=True)
    print("2026-12-05 00:33:03,307\tINFO logging_progress.py:231 -- Write: 0/1", file=sys.stderr, flush=True)
    print("[2026-12-05 00:57:45,116 W 2686 2686] network_util.cc:330: Failed to determine local IP", file=sys.stderr, flush=True)
    print("2026-12-05 00:33:03,308\tWARNING dataset.py:12 -- a real warning", file=sys.stderr, flush=True)
    print("[2026-12-06 04:00:01,048 E 31592 2179] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
          "Sampler))' and ID: 'e9d8' has constructor arguments in the object store and max_restarts > 0. If the arguments "
          "in the object store go out of scope or are lost, the actor restart will fail.", file=sys.stderr, flush=True)
    print("\x1b[33m(raylet)\x1b[0m Task Scorer.__ray_terminate__ failed. There are 3 retries remaining, so the task will "
          "be retried. Error: The actor is temporarily unavailable: IntentionalSystemExit: Worker exits with an exit "
          "code 0. exit_actor() is called.", flush=True)
    print("\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-06 08:43:23,472 E 1448 1448] (gcs_server) gcs_actor_scheduler.cc:538: "
          "Failed to kill actor 28f7, return status: Invalid: KillActor RPC failed for actor 28f7: RpcError: RPC error: "
          "Socket closed rpc_code: 14", flush=True)
    print("2026-12-07 01:41:50,703\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
          "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.", file=sys.stderr, flush=True)
    print("[2026-12-06 04:00:02,000 E 31592 2179] core_worker.cc:99: a real error", file=sys.stderr, flush=True)
    sys.stderr.write("teacher:  50%|#####     | 1/2\r"); sys.stderr.flush()
    time.sleep(0.1)
    sys.stderr.write("teacher: 100%|##########| 2/2\n"); sys.stderr.flush()
    subprocess.run(["echo", "a child's line"])  # inherits the captured descriptors
    print("[scoder-ray] [1/2] seeds: done", flush=True)
""")


def run_driver(tmp_path, mode):
    scratch = tmp_path / "tmp"  # the driver's temp folder
    scratch.mkdir()
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), mode], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr
    logs = list((tmp_path / "r" / "logs").glob("driver-*.log"))
    assert len(logs) == 1
    assert not list(scratch.iterdir())  # the local scratch copy is gone once the run directory has the log
    return out, logs[0].read_text()


def test_a_log_with_no_run_directory_is_kept_and_named(tmp_path):
    """A driver that ends before it has a run directory (a bad input found early) keeps its whole log, and says where."""
    driver = ("import sys\nfrom scoder_ray import console\nconsole.start()\n"
              "print('(MapWorker pid=1) INFO the line the console left out', flush=True)\nsys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 2 and "the line the console left out" not in out.stdout
    kept = list(tmp_path.glob("scoder-ray-driver-*.log"))
    assert len(kept) == 1 and f"the driver's whole log is kept at {kept[0]}" in out.stderr
    assert "the line the console left out" in kept[0].read_text()
    for path in kept:
        path.unlink()
    silent = "import sys\nfrom scoder_ray import console\nconsole.start()\nsys.exit(2)\n"
    out = subprocess.run([sys.executable, "-c", silent], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 2 and "kept" not in out.stderr
    assert not list(tmp_path.glob("scoder-ray-driver-*.log"))  # an empty log is not kept (56 were left in /tmp)


def test_a_killed_drivers_log_is_made_whole_by_the_next_driver_of_its_run(tmp_path):
    """SIGKILLed after its last copy to the run directory, a driver leaves its scratch log: the next driver of the
    same run uploads it whole (its last lines are how it ended) and removes it; another run's and a live
    driver's scratch logs are left alone."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    killed = ("import os, signal\nfrom scoder_ray import console\nfrom scoder_ray.store import RunStore\n"
              "console.start()\nconsole.attach(RunStore(%r, %r))\nprint('[scoder-ray] final ...', flush=True)\n"
              "print('last words', flush=True)\nimport time; time.sleep(0.5)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "TMPDIR": str(scratch)}
    for run in ("r", "other"):
        out = subprocess.run([sys.executable, "-c", killed % (str(tmp_path), run)], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == -9 and "last words" in out.stdout
    [log] = (tmp_path / "r" / "logs").glob("driver-*.log")
    assert "last words" not in log.read_text()  # copied when it attached, before them
    assert len(list(scratch.glob("scoder-ray-driver-*.log"))) == 2
    live = scratch / f"scoder-ray-driver-{os.getpid()}-x.log"  # this process: alive
    live.write_text("a driver still running")
    (scratch / f"{live.name}.dest").write_text(json.dumps({"root": str(tmp_path), "run_id": "r", "name": "live.log"}))

    from scoder_ray.console import recover_killed_logs
    from scoder_ray.store import RunStore

    os.environ["TMPDIR"], before = str(scratch), os.environ.get("TMPDIR")
    tempfile.tempdir = None  # read $TMPDIR again
    try:
        assert recover_killed_logs(RunStore(str(tmp_path), "r")) == [log.name]
    finally:
        os.environ.pop("TMPDIR") if before is None else os.environ.update(TMPDIR=before)
        tempfile.tempdir = None
    assert log.read_text().rstrip().endswith("last words") and "[scoder-ray] final ..." in log.read_text()
    left = sorted(p.name for p in scratch.iterdir())
    assert len(left) == 4 and f"{live.name}.dest" in left  # the other run's pair, the live one's pair
    assert not (tmp_path / "r" / "logs" / "live.log").exists()


def test_a_killed_drivers_log_on_another_s3_store_with_the_same_path_is_left_alone(tmp_path, s3_server, monkeypatch):
    """Two S3-compatible stores can hold the same bucket path (a MinIO here, AWS there; two test servers): a
    killed driver's scratch log goes only to the store it was written for, named by its endpoint too."""
    from scoder_ray.console import SCRATCH, recover_killed_logs
    from scoder_ray.store import RunStore

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = f"s3://{s3_server['bucket']}/console-endpoint"
    for endpoint, name in ((s3_server["url"], "ours.log"), ("http://127.0.0.1:9", "theirs.log")):
        log = tmp_path / f"{SCRATCH}{dead.pid}-{name}"
        log.write_text(f"the last lines of {name}")
        (tmp_path / f"{log.name}.dest").write_text(json.dumps({"root": root, "run_id": "r", "endpoint": endpoint,
                                                               "name": name}))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read $TMPDIR again
    store = RunStore(root, "r")
    assert recover_killed_logs(store) == ["ours.log"]
    assert store.fs.open_input_stream(f"{store.base}/logs/ours.log").read() == b"the last lines of ours.log"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SCRATCH}{dead.pid}-theirs.log",
                                                          f"{SCRATCH}{dead.pid}-theirs.log.dest"]


def test_the_quiet_console_keeps_our_lines_and_the_log_keeps_everything(tmp_path):
    out, log = run_driver(tmp_path, "quiet")
    assert "[scoder-ray] log: " in out.stdout and "--verbose shows them" in out.stdout
    assert "seeds ..." in out.stdout and "seeds: done" in out.stdout and "a child's line" in out.stdout
    assert "training resumes after step 4" in out.stdout  # a worker's line of our own stays
    assert "Initializing an engine" not in out.stdout and "Write: 0/1" not in out.stderr
    assert "Failed to determine local IP" not in out.stderr
    # Ray's false alarms at every pool (a Ray Data actor's arguments; an actor ending as asked) are left out,
    # Ray core's other errors are not.
    assert "constructor arguments" not in out.stderr and "__ray_terminate__" not in out.stdout
    assert "Failed to kill actor" not in out.stdout and "Token authentication is enabled" not in out.stderr
    assert "a real error" in out.stderr
    assert "a real warning" in out.stderr and "teacher:  50%" in out.stderr and "2/2" in out.stderr
    for line in ("Initializing an engine", "Write: 0/1", "Failed to determine local IP", "a real warning", "teacher:  50%", "a child's line",
                 "training resumes", "seeds: done", "constructor arguments", "__ray_terminate__", "Failed to kill actor",
                 "Token authentication is enabled"):
        assert line in log, line


def test_verbose_shows_everything(tmp_path):
    out, log = run_driver(tmp_path, "verbose")
    assert "Initializing an engine" in out.stdout and "Write: 0/1" in out.stderr
    assert "--verbose shows them" not in out.stdout and "Initializing an engine" in log


def test_ray_datas_false_no_cpu_warning_is_left_out_and_its_other_warnings_kept():
    """Side-by-side pools hold every CPU on purpose (their writes ask for none), so Ray Data's "the Dataset job
    will hang" at a dataset's start is false here; its other warnings still reach the console."""
    import logging

    from scoder_ray.ray_env import quiet_known_warnings

    quiet_known_warnings()
    quiet_known_warnings()  # once per driver process, however many stages start Ray
    log = logging.getLogger("ray.data.dataset")
    assert sum(type(f).__name__ == "_NoFreeCpuWarning" for f in log.filters) == 1
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # Ray Data's loggers do not propagate to caplog
    log.addHandler(handler)
    try:
        log.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
        log.warning("Warning: something else")
    finally:
        log.removeHandler(handler)
    assert seen == ["Warning: something else"]
    # Ray Data's memory detector is off (the influence stage checks its actors' peak itself); the others stay.
    import ray

    detectors = [d.__name__ for d in ray.data.DataContext.get_current().issue_detectors_config.detectors]
    assert "HighMemoryIssueDetector" not in detectors and detectors


@pytest.mark.slow
def test_the_run_leaves_the_ray_it_started_and_never_a_callers(ray_local):
    """`run`, `stage` and the demo leave their Ray before the console stops (what its workers print as their
    pools end is then filtered, not printed after the run's last line), but not a Ray they were handed."""
    from scoder_ray.config import RayConf
    from scoder_ray.ray_env import init_ray, shutdown_ray

    init_ray(RayConf())
    shutdown_ray()
    assert ray_local.is_initialized()
    code = ("import ray; from scoder_ray.config import RayConf; from scoder_ray.ray_env import init_ray, shutdown_ray; "
            "init_ray(RayConf(num_cpus=1, include_dashboard=False)); shutdown_ray(); print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
