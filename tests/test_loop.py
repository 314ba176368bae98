"""The whole loop on the tiny-loop preset, end to end, as users run it on a cluster:

- a two-node Ray cluster on one machine that shares nothing but the network: a token-auth head
  (`ray start --head` on 127.0.0.1, 0 CPUs: it runs the driver only) and a worker node joined with
  `ray start --address` inside its own mount namespace (a private tmpfs over /tmp and the caches), where
  every engine, training worker and feature actor runs; the run root is a real S3 server (moto);
- the loop submitted with `ray job submit`; a request without the token (or with a wrong one) is refused;
- the job's driver SIGKILLed at three hard moments (while the teacher's requests are in flight, while an
  influence feature shard is being computed on the worker node, while `final` writes its blocks), the job
  submitted again after each and resumed from the object store: the teacher is not paid twice for an answer it
  gave, the killed feature shard and `final` go on in their killed attempts keeping what they had written,
  nothing finished is redone; a training worker on the worker
  node is SIGKILLed and resumes from its checkpoint there;
- the driver's progress counters reach the head's Prometheus metrics endpoint;
- w learned from a labels file on S3 by one more job.
The teacher is asked over HTTP (a stand-in for a proprietary one, tests/stand_in_teacher.py); the synthesizer
continues from the one that sampled (`loop.retrain_from: previous`, 2 epochs): its model folder comes from
the run root to the training node like a checkpoint does, and it takes a fifth of the default's 30 epochs
from base (CI time; what `base` picks is unit-tested). Until 2026-12-06 a second loop on a local root was
killed at those moments and compared by dataset digest: 8-10 minutes of CI for the same stages' code.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import fnmatch
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from scoder_ray import s3_local
from stand_in_teacher import StandInTeacher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # a module fixture runs the whole loop in four jobs
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def loop_args(teacher: StandInTeacher, cache_dir: str) -> list[str]:
    """The tiny loop as a user runs it: a teacher over HTTP (its 64 seeds, as many as the preset's stand-in
    samples file holds); the retrain continues from the synthesizer that sampled (2 epochs at lr 5e-4, as the
    preset measured). One iteration: a second exercises no stage the first does not (CI time; what iteration 2
    reads of iteration 1 is unit-tested)."""
    return ["--preset", "tiny-loop", "loop.iterations=1", "teacher.samples_file=", f"teacher.base_url={teacher.url}",
            f"teacher.model={teacher.model}", "teacher.num_seeds=64", f"teacher.cache_dir={cache_dir}",
            "loop.retrain_from=previous", "loop.retrain_epochs=2", "loop.retrain_lr=5e-4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_ray_under(temp_dir: str) -> None:
    """Stop the Ray processes of one head only (`ray stop` would stop every Ray on the machine)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def http_json(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read().decode())


def http_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def ns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def kill_namespace(ns: str) -> None:
    """Every process of one mount namespace: the worker node and nothing else."""
    for p in psutil.process_iter():
        try:
            if ns_of(p.pid) == ns:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, PermissionError):
            pass


# The worker node's shell: a private tmpfs over /tmp (the head's temp dir and session files, the job's
# working directory, HOME and the caches under it) and over the user's ~/.cache; only the code itself
# (the repository and its venv, if they live under /tmp) is mounted back, read-only.
WORKER_NODE = r"""
set -e
mount -t tmpfs tmpfs /mnt
i=0
for keep in $KEEP; do
  mkdir -p /mnt/keep$i && mount --bind "$keep" /mnt/keep$i && i=$((i+1))
done
mount -t tmpfs tmpfs /tmp
[ -d "$USER_CACHE" ] && mount -t tmpfs tmpfs "$USER_CACHE"
i=0
for keep in $KEEP; do
  mkdir -p "$keep" && mount --move /mnt/keep$i "$keep" && mount -o remount,bind,ro "$keep" && i=$((i+1))
done
mkdir -p "$HOME"
exec "$RAY" start --block "$@"
"""


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def private_network():
    """This test process (its main thread, and every process it starts meanwhile) in a new network
    namespace with only a loopback interface, so every Ray node advertises 127.0.0.1 (outside one, Ray
    advertises the machine's own address whatever --node-ip-address says) and no traffic leaves it."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET): the two-node cluster test needs root")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", b"lo", 0)))[1]
            fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))
        yield
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on one machine that share nothing but a private loopback network: a token-auth head
    with 0 CPUs (so the driver is all it runs) and a worker node with the 2 CPUs, in its own mount
    namespace, where every engine, training worker, tokenizer task and feature actor runs; an S3
    server (moto) for the run root, whose variables this process uses meanwhile; and the stand-in teacher
    on that network."""
    with private_network():
        proc, s3_env = s3_local.start(buckets=("scoder-test",))
        saved = {k: os.environ.get(k) for k in s3_env}
        os.environ.update(s3_env)
        teacher = StandInTeacher()
        try:
            yield from _two_nodes(tmp_path_factory, s3_env, teacher)
        finally:
            teacher.shutdown()
            s3_local.stop(proc)
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _two_nodes(tmp_path_factory, s3_env: dict[str, str], teacher: StandInTeacher):
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the user's gets read or written
    token = secrets.token_hex(16)
    env = {**os.environ, **s3_env, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    dash, metrics, gcs = free_port(), free_port(), free_port()
    agent_ports = lambda: [f"--dashboard-agent-listen-port={free_port()}",  # noqa: E731 - the defaults (52365,
                           f"--dashboard-agent-grpc-port={free_port()}",     # ...) belong to any other Ray here,
                           f"--runtime-env-agent-port={free_port()}"]        # such as the suite's `ray_local`
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                    *agent_ports(), "--num-cpus=0", "--object-store-memory=500000000", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    keep = sorted({p for p in (str(ROOT), os.path.realpath(sys.prefix)) if p.startswith("/tmp/")})
    keep = [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]
    worker_env = {**env, "KEEP": " ".join(keep), "RAY": RAY,
                  "USER_CACHE": os.path.join(os.path.expanduser("~"), ".cache")}
    worker = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", WORKER_NODE, "worker",
         f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--object-store-memory=1000000000", f"--temp-dir=/tmp/rayw-{secrets.token_hex(4)}",
         f"--metrics-export-port={free_port()}", *agent_ports(), "--disable-usage-stats"],
        env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            nodes = subprocess.run([RAY, "list", "nodes", f"--address={address}", "--format=json"], env=env,
                                   capture_output=True, text=True, timeout=60)
            alive = [n for n in json.loads(nodes.stdout or "[]") if n.get("state") == "ALIVE"] if nodes.returncode == 0 else []
            if len(alive) == 2:
                break
            assert worker.poll() is None, worker.stdout.read()
            assert time.time() < deadline, f"the worker node did not join: {nodes.stdout}{nodes.stderr}"
            time.sleep(2)
        yield {"env": env, "address": address, "metrics": metrics, "token": token, "home": home, "temp_dir": temp_dir,
               "nodes": alive, "worker": worker, "worker_ns": ns_of(worker.pid), "teacher": teacher}
    finally:
        kill_namespace(ns_of(worker.pid))
        kill_ray_under(temp_dir)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster: dict, entry: list[str], env: dict[str, str] | None = None) -> str:
    renv = json.dumps({"working_dir": str(ROOT), "excludes": [".whl", ".venv", "runs", ".git"]})
    for _ in range(30):  # a fresh head takes a few seconds to register its job agent
        sub = subprocess.run([RAY, "job", "submit", f"--address={cluster['address']}", "--no-wait",
                              f"--runtime-env-json={renv}", "--", *entry], env=env or cluster["env"],
                             capture_output=True, text=True, timeout=300)
        if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
            break
        time.sleep(5)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group()


# This process reaches the S3 server with boto3, whose sockets belong to the calling thread: Arrow's I/O
# threads may have been started in the machine's own network namespace by earlier tests.
def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def s3_keys(uri: str) -> list[str]:
    """Keys under an s3:// folder, relative to it, with the empty "folder/" markers Arrow's create_dir puts."""
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return [o["Key"][len(prefix.rstrip("/")) + 1:] for page in pages for o in page.get("Contents", [])]


def s3_files(uri: str) -> list[str]:
    """Files under an s3:// folder, relative to it (not the folder markers)."""
    return [k for k in s3_keys(uri) if not k.endswith("/")]


def s3_bytes(uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_text(uri: str) -> str:
    return s3_bytes(uri).decode()


def s3_put(uri: str, data: bytes) -> None:
    bucket, key = uri[len("s3://"):].split("/", 1)
    s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def s3_table(uri: str):
    """The Parquet files of an s3:// folder as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(pa.BufferReader(s3_bytes(f"{uri}/{f}")))
                             for f in sorted(s3_files(uri)) if f.endswith(".parquet")])


def writing(folder: str, stages: str, files: str) -> dict | None:
    """{stage, attempt} of a stage under the s3:// `folder` (its path matching `stages`) whose attempt holds a
    key matching `files` ("" = the attempt's own folder marker: it has begun) while the stage has no _DONE.json:
    the stage is writing its outputs. None otherwise."""
    keys = s3_keys(folder)
    for key in keys:
        parts = key.split("/")
        at = next((i for i, part in enumerate(parts) if part.startswith("attempt-")), None)
        if at is None:
            continue
        stage, rest = "/".join(parts[:at]), "/".join(parts[at + 1:])
        if fnmatch.fnmatch(stage, stages) and fnmatch.fnmatch(rest, files) and f"{stage}/_DONE.json" not in keys:
            return {"stage": f"{folder}/{stage}", "attempt": parts[at]}
    return None


def done_attempts(run: str) -> dict[str, str]:
    """stage -> the attempt its _DONE.json names, for every stage of the run finished now."""
    return {k[: -len("/_DONE.json")]: json.loads(s3_text(f"{run}/{k}"))["attempt"]
            for k in s3_files(run) if k.endswith("/_DONE.json")}


def wait_job(cluster: dict, job_id: str, out: dict, timeout: float = 30 * 60) -> str:
    """Poll the job every 2 s until it ends, scraping the head's metrics every 10 s."""
    deadline, status, last_scrape = time.time() + timeout, "", 0.0
    while time.time() < deadline:
        time.sleep(2)
        if time.time() - last_scrape >= 10:
            last_scrape = time.time()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics']}/metrics", timeout=10) as r:
                    out["scrapes"].append([line for line in r.read().decode().splitlines() if "scoder_ray_" in line])
            except OSError:
                pass
        status = http_json(f"{cluster['address']}/api/jobs/{job_id}", cluster["token"])["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
    return status


def job_logs(cluster: dict, job_id: str) -> str:
    """The driver's whole log, from the head's log folder (`ray job logs` returns only its tail)."""
    return Path(f"{cluster['temp_dir']}/session_latest/logs/job-driver-{job_id}.log").read_text(errors="replace")


def kill_driver_when(moment, out: dict, name: str, interval: float) -> threading.Event:
    """Poll `moment()` every `interval` s; once it returns what it saw, SIGKILL the job's driver on the head
    (the entrypoint and its shell) and note both under out["killed"][name]. Set the event to stop polling."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen = moment()
            if seen is not None:
                pids = []
                for p in psutil.process_iter(["cmdline"]):
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "jobs/run_loop.py" in cmd and "run.id=job" in cmd:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            p.kill()
                            pids.append(p.pid)
                out["killed"][name] = {"pids": pids, **(seen if isinstance(seen, dict) else {})}
                return
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True).start()
    return stop


@pytest.fixture(scope="module")
def job_run(cluster):
    """The tiny loop submitted to the two-node cluster with its state on S3, its driver SIGKILLed at four hard
    moments and the job submitted again after each: (1) while the teacher's requests are in flight (some answers
    cached, most not), (2) while an influence feature shard is being computed on the worker node (its attempt
    exists, no _DONE.json), (3) while `final` writes its generated blocks, (4) while `evaluate` has judged the
    base model and not the fine-tuned one. In the fourth job one of the training workers (on the worker node) is
    SIGKILLed during train_scoder after a resumable checkpoint reached the object store; the fifth ends the loop."""
    root = "s3://scoder-test/cluster"
    run = f"{root}/job"
    address, token, teacher = cluster["address"], cluster["token"], cluster["teacher"]
    started = time.time()
    cache = Path(cluster["home"]) / "teacher-cache"  # the driver's, on the head
    out = {"token": token, "address": address, "root": root, "run": run, "scrapes": [], "killed": {}, "jobs": [],
           "teacher": teacher, "cluster": cluster, "worker_pid": cluster["worker"].pid, "home": str(cluster["home"])}
    out["no_token_status"] = http_status(f"{address}/api/jobs/", {})
    out["wrong_token_status"] = http_status(f"{address}/api/jobs/", {"Authorization": "Bearer nope"})
    out["token_status"] = http_status(f"{address}/api/jobs/", {"Authorization": f"Bearer {token}"})
    # HumanEval+ beside HumanEval: a problems file on the driver's node (two of HumanEval's problems with more inputs)
    from test_evaluate_samples import evalplus_humaneval_file

    plus = evalplus_humaneval_file(Path(cluster["home"]) / "HumanEvalPlus.jsonl.gz")
    entry = [sys.executable, "jobs/run_loop.py", *loop_args(teacher, str(cache)),
             f"run.root={root}", "run.id=job", "train.scoder.resume_every=2", "train.scoder.epochs=3",
             "evaluate.benchmarks=[humaneval,humaneval+]", f"evaluate.problems.humaneval+={plus}"]
    out["entry"] = entry
    wrong = subprocess.run([RAY, "job", "submit", f"--address={address}", "--no-wait", "--", *entry],
                           env={**cluster["env"], "RAY_AUTH_TOKEN": "wrong"}, capture_output=True, text=True, timeout=120)
    out["wrong_submit"] = (wrong.returncode, wrong.stdout + wrong.stderr)

    def job(moment=None, name: str = "", interval: float = 0.2) -> None:
        job_id = submit(cluster, entry)
        stop = kill_driver_when(moment, out, name, interval) if moment else None
        status = wait_job(cluster, job_id, out)
        if stop:
            stop.set()
        out["jobs"].append({"killed_at": name, "status": status, "logs": job_logs(cluster, job_id),
                            "done": done_attempts(run)})
        if name in ("final", "evaluate"):  # what a user sees of the interrupted stage from another process
            out["jobs"][-1]["status_cli"] = subprocess.run(
                [sys.executable, "-m", "scoder_ray.cli", "status", run], env=cluster["env"], capture_output=True,
                text=True, timeout=120).stdout

    cached = lambda: sorted(cache.glob("*/*.json"))  # noqa: E731 - answers written (a temp file has another suffix)
    teacher.delay_s, served_before = 0.5, len(teacher.served)  # 16 requests at a time, 4 waves of 0.5 s
    job(lambda: True if len(cached()) >= 4 else None, "bootstrap", interval=0.02)
    teacher.delay_s = 0.0
    time.sleep(2)  # answers in flight when the client died are still counted as served once they are written
    out["teacher_paid"], out["answered"] = len(teacher.served) - served_before, len(cached())
    out["served_before"] = served_before
    job(lambda: writing(f"{run}/iter_01/features", "*-candidate", "_ATTEMPT.json"), "features")
    job(lambda: writing(run, "final", "raw/data/*.parquet"), "final")
    killed = out["killed"]["final"]  # what the killed attempt had written, before the next job collects it
    out["final_killed_raw"] = {r["cand_id"]: r["raw"] for r in
                               s3_table(f"{killed['stage']}/{killed['attempt']}/raw/data").to_pylist()}

    def kill_training_worker():  # polls fast: train_scoder's steps take a fraction of a second each
        deadline = time.time() + 40 * 60
        while time.time() < deadline and len(out["jobs"]) < 4:  # the fourth job trains the SCoder model
            # A checkpoint counts once Ray Train's controller registered it (its snapshot names it); one
            # merely uploaded when the worker dies is not resumed from.
            if any(f.endswith("/checkpoint_manager_snapshot.json") and "train_scoder" in f
                   for f in s3_files(f"{run}/_ray_train")):
                for p in psutil.process_iter(["cmdline"]):
                    try:  # a training worker of this cluster's worker node (not of any other Ray here)
                        if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []) and ns_of(p.pid) == cluster["worker_ns"]:
                            out["killed"]["train_worker"] = {"pid": p.pid, "on_worker_node": True}
                            p.kill()
                            return
                    except (psutil.NoSuchProcess, FileNotFoundError):
                        continue
            time.sleep(0.1)

    killer = threading.Thread(target=kill_training_worker, daemon=True)
    killer.start()
    job(lambda: writing(run, "evaluate", "_base-evaluated.json"), "evaluate")
    killer.join(timeout=5)
    job()
    out["status"], out["logs"] = out["jobs"][-1]["status"], out["jobs"][-1]["logs"]
    out["last_two_logs"] = "\n".join(j["logs"] for j in out["jobs"][3:])  # the SCoder model trained, then evaluated
    out["all_logs"] = "\n".join(j["logs"] for j in out["jobs"])
    out["done"] = lambda stage: json.loads(s3_text(f"{run}/{stage}/_DONE.json"))
    # evaluate's local scratch folder on the driver's node (the run root is S3): removed when the stage ends
    out["eval_scratch_left"] = [d for d in Path(tempfile.gettempdir()).glob("scoder-eval-*") if d.stat().st_mtime >= started]
    yield out


@pytest.mark.timeout(3000)  # the fixture runs the whole tiny loop, killed four times (~15 min on 2 cores)
def test_job_submit_needs_the_token(job_run):
    assert job_run["no_token_status"] == 401 and job_run["wrong_token_status"] in (401, 403)
    assert job_run["token_status"] == 200
    code, text = job_run["wrong_submit"]
    assert code != 0 and re.search(r"401|403|[Uu]nauthori[sz]ed|[Aa]uthentication|[Ff]orbidden", text), text[-2000:]


def test_the_cluster_shares_no_files(cluster):
    """The worker node cannot see the head's temp dir, the test's HOME, or anything else under /tmp."""
    assert [n["node_ip"] for n in cluster["nodes"]] == ["127.0.0.1", "127.0.0.1"]
    worker_root = f"/proc/{cluster['worker'].pid}/root"  # the worker node's view of the filesystem
    marker = Path(cluster["home"]) / "written-on-the-head"
    marker.write_text("x")
    assert not os.path.exists(worker_root + str(marker)) and not os.path.exists(worker_root + cluster["temp_dir"])
    assert os.path.isfile(worker_root + sys.executable)  # the code itself is there


def test_tiny_loop_on_two_nodes_with_an_s3_root_resumes_after_kills(job_run):
    done, killed, jobs, run = job_run["done"], job_run["killed"], job_run["jobs"], job_run["run"]
    assert [j["killed_at"] for j in jobs] == ["bootstrap", "features", "final", "evaluate", ""]
    assert job_run["eval_scratch_left"] == []  # the killed driver's scratch folder was removed by the next one
    assert set(killed) == {"bootstrap", "features", "final", "evaluate", "train_worker"}, killed
    for j in jobs[:4]:  # each killed where it was meant to be, before the loop ended
        assert j["status"] == "FAILED" and "final dataset" not in j["logs"], j["logs"][-3000:]
    assert "SUCCEEDED" in job_run["status"], job_run["logs"][-5000:]
    assert "bootstrap ..." in jobs[0]["logs"] and "bootstrap: done" not in jobs[0]["logs"], jobs[0]["logs"][-3000:]
    assert "iter_01/influence ..." in jobs[1]["logs"] and "final ..." in jobs[2]["logs"]
    # Each resubmitted job resumed from the object store: what was done stayed done (the same attempt), and the
    # loop's stages say so; the killed attempts were collected and redone.
    for before, after in zip(jobs, jobs[1:]):
        for stage, attempt in before["done"].items():
            assert after["done"][stage] == attempt, stage
            if "/features/" not in stage:
                assert f"{stage}: skipped (already done)" in after["logs"], stage
    # The killed feature shard and `final` went on in their killed attempts: what was written before the kill
    # was kept, not paid for again, and the rest computed beside it.
    stage, attempt = killed["features"]["stage"], killed["features"]["attempt"]
    shard = done(stage[len(run) + 1:])
    assert shard["attempt"] == attempt and shard["rows"] == done("iter_01/features/candidates")["rows"], shard
    assert f"{stage[len(run) + 1:]}: resuming the interrupted attempt {attempt}" in jobs[2]["logs"]
    before = job_run["final_killed_raw"]
    final = done("final")
    assert final["attempt"] == killed["final"]["attempt"] and final["resumed_rows"] >= len(before) > 0, final
    assert f"final: resuming the interrupted attempt {final['attempt']}" in jobs[3]["logs"]
    assert re.search(rf"final: {final['resumed_rows']} of {final['generated']} samples already written", jobs[3]["logs"])
    # `evaluate` went on in its killed attempt: the base model, judged before the kill, was not generated again.
    ev = done("evaluate")
    assert ev["attempt"] == killed["evaluate"]["attempt"] and ev["kept_from_interrupted"] == ["base"], ev
    assert "evaluate base on humaneval: " in jobs[3]["logs"] and "evaluate scoder on humaneval: " not in jobs[3]["logs"]
    assert "evaluate base: kept from the interrupted attempt" in jobs[4]["logs"]
    # `scoder-ray status` between the jobs named what the killed stages held: final's rows, evaluate's models
    assert re.search(rf"^final +partial +{len(before)} .* interrupted in {killed['final']['attempt']}: rows written so far",
                     jobs[2]["status_cli"], re.M), jobs[2]["status_cli"]
    assert re.search(rf'^evaluate +partial +\d+ .* interrupted in {ev["attempt"]}: judged so far: base \{{"humaneval": ',
                     jobs[3]["status_cli"], re.M), jobs[3]["status_cli"]
    assert "evaluate base on humaneval: " not in jobs[4]["logs"] and "evaluate scoder on humaneval: " in jobs[4]["logs"]
    kept = {r["cand_id"]: r["raw"] for r in s3_table(f"{run}/final/{final['attempt']}/raw/data").to_pylist()}
    assert {c: kept.get(c) for c in before} == before and len(kept) == final["generated"]

    # The teacher, killed mid-requests, is not paid twice for an answer it already gave.
    answered, paid = job_run["answered"], job_run["teacher_paid"]
    assert 4 <= answered < 64 and answered <= paid < 64, (answered, paid)
    boot = done("bootstrap")  # asked over HTTP
    assert boot["usage"]["cache_hits"] == answered and boot["usage"]["requests_sent"] == 64 - answered, boot["usage"]
    assert len(job_run["teacher"].served) - job_run["served_before"] == paid + 64 - answered
    assert boot["teacher"]["model"] == "stand-in-teacher" and boot["rows"] == 64 and boot["parse_rate"] == 1.0

    logs = job_run["last_two_logs"]
    assert killed.get("train_worker", {}).get("on_worker_node"), killed  # resumed from the checkpoint on S3
    assert re.search(r"training resumes after step \d+ of \d+ from scoder-test/cluster/job/_ray_train/job-train_scoder", logs)
    # Models reached the worker node through its own cache (copies from S3), never through the head's disk.
    cache = f"/proc/{job_run['worker_pid']}/root{job_run['home']}/.cache/scoder-ray"
    assert os.listdir(f"{cache}/node-models") and os.path.isdir(f"{cache}/models/tiny-seed0")
    assert not os.path.exists(f"{job_run['home']}/.cache/scoder-ray/node-models")
    scoder = done("train_scoder")
    metrics = s3_text(f"{run}/train_scoder/{scoder['attempt']}/metrics.jsonl").splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(1, scoder["total_steps"] + 1))

    final = done("final")
    assert f"digest {final['dataset_digest']}" in logs
    assert final["rows"] > 0 and final["parse_rate"] > 0
    seeds = done("seeds")["rows"]
    for t in (1,):  # candidates flowed through every filter of the iteration
        it = f"iter_{t:02d}"
        assert seeds == 64 and done(f"{it}/sample")["rows"] == 2 * 2 * 32  # M x N x sample.num_seeds
        kept = done(f"{it}/influence")
        assert 0 < kept["rows"] <= done(f"{it}/rank")["rows"]
        data = done(f"{it}/train_data")
        assert data["by_origin"]["teacher"] == 64 and data["by_origin"][it] == kept["rows"]
        train = done(f"{it}/train")
        # continued from the synthesizer that sampled: a model folder on S3, copied to the training node
        assert train["inputs"]["from"] == "previous" and train["model"].startswith("s3://scoder-test/cluster/job/train_synthesizer/")
        assert train["total_steps"] == 2 * (data["rows"] // 8)  # 2 epochs of 2 workers x 4
        assert "config.json" in s3_files(f"{run}/{it}/train/{train['attempt']}/ckpt_02")
        assert "degenerate" in done(f"{it}/score")["judge_signal"]  # the judge was checked
    ev = done("evaluate")
    assert set(ev["results"]) == {"base", "scoder"} and "pass@1" in ev["results"]["scoder"]["humaneval"]
    assert ev["prompting"] == {"base": "completion", "scoder": "chat"}
    # HumanEval+'s problems are HumanEval's prompts: generated once per model, judged by both (as EvalPlus does)
    assert ev["completions"] == {"base": 10, "scoder": 10} and ev["rows"] == 2 * (10 + 2), ev
    assert all("pass@1" in ev["results"][m]["humaneval+"] for m in ("base", "scoder")), ev["results"]
    for m in ("base", "scoder"):
        answers = {b: {r["task_id"]: r["raw"] for r in map(json.loads, s3_text(
            f"{run}/evaluate/{ev['attempt']}/{m}-{b}.jsonl").splitlines())} for b in ("humaneval", "humanevalplus")}
        assert answers["humanevalplus"] == {t: answers["humaneval"][t] for t in ("HumanEval/2", "HumanEval/4")}
    # The final dataset went through every gate: what was dropped is counted, decontamination is on record.
    assert final["decontam"]["checked"] == ["humaneval"] and "mbpp" in final["decontam"]["skipped"]
    assert final["rows"] == min(final["target"], final["generated"] - sum(final["rejected"].values()))
    assert final["audit"]["placeholders"] == final["audit"]["prompt_echoes"] == 0
    assert 0 < final["seeds_yielding"] <= final["seeds"]
    assert final["diversity"]["k"] == min(final["rows"], 64) and final["diversity"]["ratio"] > 0.5  # beside the teacher's
    assert any("seeds" in w and "yielded" in w for w in final["warnings"]) == (final["seeds_yielding"] < final["seeds"] / 2)
    # A synthesizer that copies its seeds writes the same code many times: the dataset holds each code once.
    from scoder_ray.quality import code_key

    solutions = s3_table(f"{run}/final/{final['attempt']}/data").column("solution").to_pylist()
    assert len({code_key(s) for s in solutions}) == len(solutions) == final["rows"]
    assert final["rejected"].get("duplicate_solution", 0) == final["duplicate_solutions"]
    # The console (the job's log) is scoder-ray's lines and real warnings; RUN_DIR/logs/ has everything, per driver.
    from scoder_ray.console import noise

    for j in jobs[3:]:  # before "Running entrypoint": the job supervisor's own lines
        console = j["logs"].split("Running entrypoint for job", 1)[1]
        assert not [line for line in console.splitlines() if noise(line)] and "[scoder-ray] log: s3://scoder-test/" in console
    driver_logs = [f for f in s3_files(f"{run}/logs") if f.startswith("driver-")]
    assert len(driver_logs) == 5, driver_logs  # the killed jobs' (copied after each of their stages) and this one's
    texts = [s3_text(f"{run}/logs/{f}") for f in driver_logs]
    assert len([t for t in texts if "final dataset: " in t]) == 1  # the last job's, whole
    trained = [t for t in texts if "train_scoder: done" in t]
    assert len(trained) == 1 and "RayTrainWorker pid=" in trained[0]  # the fourth job's, made whole
    # The killed drivers' logs were made whole by the next job (their last lines: how each ended), and their
    # scratch copies on the head are gone.
    assert job_run["all_logs"].count("the log of a driver that was killed") == 4, job_run["all_logs"][-3000:]
    # (`final ...` is printed after the last copy a killed driver made: only the recovered log holds it)
    final_killed = [t for t in texts if re.search(r"\] final \.\.\.", t) and not re.search(r"final: (done|skipped)", t)]
    assert len(final_killed) == 1, driver_logs
    pids = [p for k in ("bootstrap", "features", "final", "evaluate") for p in killed[k]["pids"]]
    assert not [f for p in pids for f in Path(tempfile.gettempdir()).glob(f"scoder-ray-driver-{p}-*")], pids
    # Training shows its progress from rank 0 (Ray Train's own per-step reports are in the log file only).
    assert re.search(r"\[scoder-ray\] train_scoder: step \d+/\d+ \(\d+%\), loss [\d.]+, [\d,]+ tokens/s, ETA \d+m\d\ds", logs)
    assert "Reporting training result" not in logs and "Reporting training result" in trained[0]
    # The object store's credentials reached every node through its environment, and nothing wrote them down.
    secret = s3_local.CLIENT_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in job_run["all_logs"]
    for key in s3_files(run):
        assert secret.encode() not in s3_bytes(f"{run}/{key}"), key
    report = s3_text(f"{run}/report.html")
    assert report.count('class="plotly-graph-div"') >= 4 and "Evaluation" in report and "iter_01" in report  # one iteration: no trend chart
    assert "<h2>Samples</h2>" in report and "accepted" in report and "rejected" in report


def test_progress_counters_reach_the_metrics_endpoint(job_run):
    # Ray exports application metrics with its own `ray_` prefix (and `_total` on counters).
    lines = [line for scrape in job_run["scrapes"] for line in scrape if not line.startswith("#")]
    named = [(re.sub(r"^ray_", "", line.split("{")[0]), line) for line in lines]
    seen = {name for name, _ in named}
    assert {"scoder_ray_stage_rows_out", "scoder_ray_loop_progress", "scoder_ray_stage_seconds",
            "scoder_ray_stages_done_total"} <= seen, seen
    rows_out = [line for name, line in named if name == "scoder_ray_stage_rows_out"]
    assert any('stage="iter_01/sample"' in line and 'run="job"' in line for line in rows_out)
    # While a stage runs, its progress gauge moves (per block): iter_01/sample seen part-way (its first
    # checkpoint's candidates done, the second's engine still starting) and the console says the same.
    fractions = {}
    for name, line in named:
        if name == "scoder_ray_stage_done_fraction" and 'run="job"' in line:
            fractions.setdefault(re.search(r'stage="([^"]+)"', line).group(1), set()).add(float(line.rsplit(" ", 1)[1]))
    assert any(0 < f < 1 for f in fractions.get("iter_01/sample", ())), fractions
    assert re.search(r"\[scoder-ray\] iter_01/sample: \d+/128 candidates \(\d+%\), [\d.]+/s, ETA", job_run["all_logs"])
    assert re.search(r"\[scoder-ray\] final: \d+/\d+ samples \(100%\)", job_run["all_logs"])


def test_weights_learned_from_a_labels_file_on_the_object_store(job_run):
    """w learned inside `run` from a label file on S3 (where a cluster's user keeps it): the weights stage comes
    after iter_01/score and the ranking uses it. Labels that follow one aspect must give that aspect most of w.
    (--until: the loop's later stages are not redone.)"""
    run, done = job_run["run"], job_run["done"]
    scored = s3_table(f"{run}/iter_01/score/{done('iter_01/score')['attempt']}/data").to_pylist()
    labels = f"{job_run['root']}/labels.jsonl"
    s3_put(labels, ("".join(json.dumps({"cand_id": r["cand_id"], "label": r["aspect_relevance"]}) + "\n"
                            for r in scored if r["aspect_relevance"] >= 0)
                    + json.dumps({"cand_id": "not-in-this-run", "label": 3}) + "\n").encode())
    cluster = job_run["cluster"]
    job = submit(cluster, job_run["entry"] + [f"score.labels_file={labels}", "--until", "iter_01/rank"])
    status = wait_job(cluster, job, {"scrapes": []})
    logs = job_logs(cluster, job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert re.search(r"\] weights: done in", logs) and "stopped after iter_01/rank (--until)" in logs, logs[-3000:]
    assert "iter_01/warmup ..." not in logs and "iter_01/score: skipped (already done)" in logs
    weights, rank = done("weights"), done("iter_01/rank")
    assert weights["labels"] == labels and weights["labels_unmatched"] == 1 and weights["rows"] >= 20
    assert rank["weights_source"] == "fitted" and max(rank["weights"], key=rank["weights"].get) == "relevance"
    assert rank["weights"]["relevance"] > 0.5, rank["weights"]


def test_a_local_root_is_refused_on_two_nodes(cluster, tmp_path):
    """Before any work: the job fails naming run.root and what to set, and creates nothing."""
    entry = [sys.executable, "jobs/run_loop.py", "--preset", "tiny-loop", f"run.root={tmp_path}", "run.id=local"]
    job = submit(cluster, entry)
    status = wait_job(cluster, job, {"scrapes": []}, timeout=600)
    logs = job_logs(cluster, job)
    assert status == "FAILED", logs[-3000:]
    assert f"run.root={tmp_path}: a local path, but this Ray cluster has 2 nodes" in logs and "run.shared=true" in logs
    assert "Traceback" not in logs and not (tmp_path / "local").exists()
    # With no run directory to hold it, the driver's whole log stays on the head, named (removed here: litter)
    kept = re.search(r"the driver's whole log is kept at (\S+)", logs)
    assert kept and os.path.isfile(kept[1]), logs[-2000:]
    os.unlink(kept[1])
