"""The whole loop on the tiny-loop preset (T=2), end to end, as users run it on a cluster:

- submitted with `ray job submit` to a local head started by `ray start --head` on 127.0.0.1 with token
  authentication on; a request without the token (or with a wrong one) is refused;
- the driver's progress counters reach the head's Prometheus metrics endpoint;
- a second run, its driver SIGKILLed at two different stages and restarted each time, ends with the
  same final dataset (digest) as the uninterrupted job.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SCODER = str(Path(sys.executable).with_name("scoder-ray"))


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


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """A token-auth head, the tiny loop submitted to it, metrics scraped while it runs."""
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the user's gets read or written
    runs = tmp_path_factory.mktemp("runs")
    token = secrets.token_hex(16)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    dash, metrics = free_port(), free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                    # own agent ports: the defaults (52365, ...) belong to any other Ray on this machine, such as
                    # the suite's `ray_local`, and a head without its job agent refuses every submission
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                    "--num-cpus=2", "--object-store-memory=1000000000", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dash}"
    out = {"token": token, "address": address, "runs": runs, "scrapes": []}
    try:
        out["no_token_status"] = http_status(f"{address}/api/jobs/", {})
        out["wrong_token_status"] = http_status(f"{address}/api/jobs/", {"Authorization": "Bearer nope"})
        out["token_status"] = http_status(f"{address}/api/jobs/", {"Authorization": f"Bearer {token}"})
        entry = [sys.executable, "jobs/run_loop.py", "--preset", "tiny-loop", f"run.root={runs}", "run.id=job"]
        renv = json.dumps({"working_dir": str(ROOT), "excludes": [".whl", ".venv", "runs", ".git"]})
        wrong = subprocess.run([RAY, "job", "submit", f"--address={address}", "--no-wait", f"--runtime-env-json={renv}",
                                "--", *entry], env={**env, "RAY_AUTH_TOKEN": "wrong"}, capture_output=True, text=True,
                               timeout=120)
        out["wrong_submit"] = (wrong.returncode, wrong.stdout + wrong.stderr)
        for _ in range(30):  # a fresh head takes a few seconds to register its job agent
            sub = subprocess.run([RAY, "job", "submit", f"--address={address}", "--no-wait",
                                  f"--runtime-env-json={renv}", "--", *entry], env=env, capture_output=True, text=True,
                                 timeout=300)
            if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(5)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job_id = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group()
        deadline = time.time() + 30 * 60
        status = ""
        while time.time() < deadline:
            time.sleep(10)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                    text = r.read().decode()
                out["scrapes"].append([line for line in text.splitlines() if "scoder_ray_" in line])
            except OSError:
                pass
            status = http_json(f"{address}/api/jobs/{job_id}", token)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
        logs = subprocess.run([RAY, "job", "logs", f"--address={address}", job_id], env=env, capture_output=True,
                              text=True, timeout=120)
        out["status"], out["logs"] = status, logs.stdout
        yield out
    finally:
        kill_ray_under(temp_dir)


@pytest.mark.timeout(2400)  # the fixture runs the whole tiny loop (~11 min on 2 cores)
def test_job_submit_needs_the_token(job_run):
    assert job_run["no_token_status"] == 401 and job_run["wrong_token_status"] in (401, 403)
    assert job_run["token_status"] == 200
    code, text = job_run["wrong_submit"]
    assert code != 0 and re.search(r"401|403|[Uu]nauthori[sz]ed|[Aa]uthentication|[Ff]orbidden", text), text[-2000:]


def test_tiny_loop_end_to_end_as_a_job(job_run):
    assert "SUCCEEDED" in job_run["status"], job_run["logs"][-5000:]
    run = Path(job_run["runs"]) / "job"
    final = json.loads((run / "final" / "_DONE.json").read_text())
    assert f"digest {final['dataset_digest']}" in job_run["logs"]
    assert final["rows"] > 0 and final["parse_rate"] > 0
    for t in (1, 2):  # candidates flowed through every filter of both iterations
        it = run / f"iter_{t:02d}"
        sample = json.loads((it / "sample" / "_DONE.json").read_text())
        assert sample["rows"] == 2 * 2 * json.loads((run / "seeds" / "_DONE.json").read_text())["rows"]  # M x N x seeds
        kept = json.loads((it / "influence" / "_DONE.json").read_text())
        assert 0 < kept["rows"] <= json.loads((it / "rank" / "_DONE.json").read_text())["rows"]
        data = json.loads((it / "train_data" / "_DONE.json").read_text())
        assert data["by_origin"]["teacher"] == 64 and data["by_origin"][f"iter_{t:02d}"] == kept["rows"]
        assert (it / "train" / "ckpt_02" / "config.json").is_file()
    ev = json.loads((run / "evaluate" / "_DONE.json").read_text())
    assert set(ev["results"]) == {"base", "scoder"} and "pass@1" in ev["results"]["scoder"]["humaneval"]
    report = (run / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4 and "Evaluation" in report and "iter_02" in report


def test_progress_counters_reach_the_metrics_endpoint(job_run):
    # Ray exports application metrics with its own `ray_` prefix (and `_total` on counters).
    lines = [line for scrape in job_run["scrapes"] for line in scrape if not line.startswith("#")]
    named = [(re.sub(r"^ray_", "", line.split("{")[0]), line) for line in lines]
    seen = {name for name, _ in named}
    assert {"scoder_ray_stage_rows_out", "scoder_ray_loop_progress", "scoder_ray_stage_seconds",
            "scoder_ray_stages_done_total"} <= seen, seen
    rows_out = [line for name, line in named if name == "scoder_ray_stage_rows_out"]
    assert any('stage="iter_01/sample"' in line and 'run="job"' in line for line in rows_out)


def run_until(args: list[str], env: dict[str, str], kill_at: str | None, timeout: float = 1800) -> str:
    """Run the driver; when `kill_at` (a stage name) starts, SIGKILL its whole process group."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    out, deadline = [], time.time() + timeout
    for line in proc.stdout:
        out.append(line)
        if kill_at and re.search(rf"\] {re.escape(kill_at)} \.\.\.$", line.strip()):
            time.sleep(3)  # inside the stage
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError("".join(out[-50:]))
    proc.wait()
    return "".join(out)


@pytest.mark.timeout(2400)  # three driver starts, most of the loop once (~13 min on 2 cores)
def test_killed_twice_and_resumed_gives_the_same_dataset(job_run, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    args = [SCODER, "run", "--preset", "tiny-loop", f"run.root={tmp_path}", "run.id=resumed"]
    first = run_until(args, env, kill_at="iter_01/score")
    assert "iter_01/score ..." in first and "final dataset" not in first
    second = run_until(args, env, kill_at="iter_02/train")
    assert "iter_01/sample: skipped (already done)" in second and "final dataset" not in second
    third = run_until(args, env, kill_at=None)
    assert "iter_02/sample: skipped (already done)" in third
    digest = re.search(r"final dataset: \d+ samples, digest ([0-9a-f]{64})", third).group(1)
    reference = json.loads((Path(job_run["runs"]) / "job" / "final" / "_DONE.json").read_text())["dataset_digest"]
    assert digest == reference
