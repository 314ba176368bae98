"""The run store on a local root and on a real S3-compatible server (moto, started by `s3_server`):
commits without renaming folders, attempts, resume after a kill, the driver lease, status."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from scoder_ray.cli import main
from scoder_ray.config import load_config
from scoder_ray.store import (ATTEMPT, DONE, LEASE, RunStore, StoreError, check_root, filesystem, write_table, write_text,
                              written_values)


def write_rows(n):
    def produce(uri):
        write_table(f"{uri}/data/part-0.parquet", pa.table({"x": list(range(n))}))
        return {"rows": n}
    return produce


def read_rows(store, stage) -> int:
    fs, path = filesystem(store.uri(stage) + "/data")
    return pq.read_table(path, filesystem=fs).num_rows


def listing(store, sub="") -> list[str]:
    """Names directly under the run (or a folder of it)."""
    sel = pafs.FileSelector(f"{store.base}/{sub}".rstrip("/"), allow_not_found=True)
    return sorted(i.base_name for i in store.fs.get_file_info(sel))


def kill_when(script: str, marker) -> None:
    """Run `script` in a Python process (it inherits $AWS_ENDPOINT_URL from s3_server) and SIGKILL it once it
    creates `marker`: the moment it chose, inside its stage."""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not marker.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_stage_runs_once_then_skips(run_root):
    store = RunStore(run_root, "r")
    cfg = load_config("tiny")
    calls = []

    def produce(uri):
        calls.append(uri)
        return write_rows(3)(uri)

    first = store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, produce)
    assert first["rows"] == 3 and "skipped" not in first and first["attempt"].startswith(ATTEMPT)
    second = store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, produce)
    assert second["skipped"] and second["key"] == first["key"] and len(calls) == 1
    assert read_rows(store, "s") == 3
    assert listing(store, "s") == sorted([DONE, first["attempt"]])
    assert store.uri("s") == calls[0]  # readers read exactly what the producer wrote, under its scheme
    assert calls[0].startswith("s3://") == run_root.startswith("s3://")


@pytest.mark.parametrize("change", ["config", "inputs"])
def test_stale_stage_is_redone(run_root, change):
    store = RunStore(run_root, "r")
    cfg = load_config("tiny")
    old = store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, write_rows(3))
    assert store.state("s", store.stage_key({"seeds": cfg.seeds}, {"in": "a"})).state == "done"
    cfg2 = load_config("tiny", ["seeds.max_lines=39"]) if change == "config" else cfg
    inputs2 = {"in": "b"} if change == "inputs" else {"in": "a"}
    assert store.state("s", store.stage_key({"seeds": cfg2.seeds}, inputs2)).state == "stale"
    again = store.run_stage("s", {"seeds": cfg2.seeds}, inputs2, write_rows(5))
    assert "skipped" not in again and again["rows"] == 5 and again["attempt"] != old["attempt"]
    assert read_rows(store, "s") == 5
    assert listing(store, "s") == sorted([DONE, again["attempt"]])  # the old attempt is collected


def test_nested_stage_names(run_root):
    store = RunStore(run_root, "r")
    store.run_stage("iter_01/sample", {}, {}, write_rows(2))
    store.run_stage("iter_01/features/ckpt_01-candidate", {}, {}, write_rows(2))
    assert [s.name for s in store.stages()] == ["iter_01/features/ckpt_01-candidate", "iter_01/sample"]
    assert DONE in listing(store, "iter_01/sample")


def test_a_failing_stage_leaves_nothing_that_counts(run_root):
    store = RunStore(run_root, "r")

    def boom(uri):
        write_rows(1)(uri)
        raise RuntimeError("bad row")

    with pytest.raises(RuntimeError):
        store.run_stage("s", {}, {}, boom)
    assert store.state("s").state == "partial" and store.read_done("s") is None
    with pytest.raises(StoreError, match="not done"):
        store.uri("s")
    done = store.run_stage("s", {}, {}, write_rows(2))
    assert done["rows"] == 2 and listing(store, "s") == sorted([DONE, done["attempt"]])


def test_stage_killed_mid_write_is_redone(run_root, tmp_path):
    """SIGKILL while the stage writes its files: no _DONE.json; the rerun completes and collects the attempt."""
    script = textwrap.dedent(f"""
        import time, pyarrow as pa
        from scoder_ray.store import RunStore, write_table
        def produce(uri):
            write_table(uri + "/data/part-0.parquet", pa.table({{"x": [1]}}))
            open({str(tmp_path / 'started')!r}, "w").close()
            time.sleep(60)
            write_table(uri + "/data/part-1.parquet", pa.table({{"x": [2]}}))
            return {{"rows": 2}}
        RunStore({run_root!r}, "r").run_stage("s", {{}}, {{}}, produce)
    """)
    kill_when(script, tmp_path / "started")
    store = RunStore(run_root, "r")
    assert store.read_done("s") is None and store.state("s").state == "partial"
    assert [s.state for s in store.stages()] == ["partial"]
    done = store.run_stage("s", {}, {}, write_rows(4))
    assert done["rows"] == 4 and store.state("s").state == "done" and read_rows(store, "s") == 4
    assert listing(store, "s") == sorted([DONE, done["attempt"]])


def test_a_resumable_stage_killed_mid_write_goes_on_in_its_attempt(run_root, tmp_path, capsys):
    """SIGKILL while a resumable stage writes its second file: the rerun with the same key goes on in the same
    attempt, keeps the rows of the whole file, drops the cut-off one (a local file is left half written; an
    object never appeared), and writes only the rows missing. Another key, or force, starts afresh."""
    script = textwrap.dedent(f"""
        import io, time, pyarrow as pa, pyarrow.parquet as pq
        from scoder_ray.store import RunStore, filesystem, write_table
        def produce(uri):
            write_table(uri + "/data/part-0.parquet", pa.table({{"x": [0, 1, 2]}}))
            buf = io.BytesIO()
            pq.write_table(pa.table({{"x": [3, 4, 5]}}), buf)
            fs, path = filesystem(uri + "/data/part-1.parquet")
            with fs.open_output_stream(path) as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                open({str(tmp_path / 'writing')!r}, "w").close()
                time.sleep(60)
            return {{"rows": 6}}
        RunStore({run_root!r}, "r").run_stage("s", {{}}, {{"in": "a"}}, produce, resume=True)
    """)
    kill_when(script, tmp_path / "writing")
    store = RunStore(run_root, "r")
    [killed] = [n for n in listing(store, "s") if n.startswith(ATTEMPT)]
    store.write_config(load_config("tiny"))
    capsys.readouterr()
    assert main(["status", f"{run_root}/r"]) == 0
    assert re.search(rf"^s +partial +3 .* interrupted in {killed}: rows written so far; a rerun with the same config "
                     "goes on in it$", capsys.readouterr().out, re.M)  # the whole file's rows, not the cut one's
    lease = store.acquire_lease()  # a driver holds the run: the attempt is being written
    try:
        assert main(["status", f"{run_root}/r"]) == 0
        assert re.search(rf"^s +running +3 .* running in {killed}: rows written so far$", capsys.readouterr().out, re.M)
        assert main(["status", f"{run_root}/r", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["s"] == {"state": "partial", "attempt": killed, "rows_so_far": 3}
    finally:
        lease.release()
    seen = []

    def rest(uri):
        have = written_values(uri + "/data", "x")
        seen.append((uri.rsplit("/", 1)[1], sorted(have)))
        missing = [x for x in range(6) if x not in have]
        write_table(f"{uri}/data/part-2.parquet", pa.table({"x": missing}))
        return {"rows": 6}

    done = store.run_stage("s", {}, {"in": "a"}, rest, resume=True)
    assert seen == [(killed, [0, 1, 2])] and done["attempt"] == killed
    fs, path = filesystem(store.uri("s") + "/data")
    assert sorted(pq.read_table(path, filesystem=fs).column("x").to_pylist()) == list(range(6))
    assert sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))) == ["part-0.parquet", "part-2.parquet"]
    assert store.verify("s", done) == []  # the marker and the kept files are in its manifest
    assert store.run_stage("s", {}, {"in": "a"}, rest, resume=True)["skipped"]

    # A leftover begun under another key, or a forced rerun, is not resumed: the stage starts afresh.
    def stop(uri):
        write_table(f"{uri}/data/part-0.parquet", pa.table({"x": [9]}))
        raise RuntimeError("stopped")

    for inputs, force in (({"in": "b"}, False), ({"in": "a"}, True)):
        with pytest.raises(RuntimeError):
            store.run_stage("t", {}, {"in": "a"}, stop, resume=True)
        seen.clear()
        store.run_stage("t", {}, inputs, rest, resume=True, force=force)
        assert seen[0][1] == [] and len([n for n in listing(store, "t") if n.startswith(ATTEMPT)]) == 1


def test_status_of_an_interrupted_evaluate_names_the_models_judged(run_root, capsys):
    """evaluate writes JSONL per model, not Parquet: `status` counts and names the models whose marker the
    interrupted attempt holds (what a rerun keeps), not 0 rows."""
    from scoder_ray.evaluate.stage import MODEL_DONE, STAGE

    store = RunStore(run_root, "r")
    store.write_config(load_config("tiny"))
    judged = {"results": {"humaneval": {"pass@1": 0.25}}, "completions": {"humaneval": 4}, "rows": 4, "engine_start_s": 1.0}

    def stopped(uri):  # the base model judged, the driver gone before the fine-tuned one
        write_text(f"{uri}/base-humaneval.jsonl", "{}\n" * 4)
        write_text(f"{uri}/{MODEL_DONE.format(model='base')}", json.dumps(judged))
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        store.run_stage(STAGE, {}, {"in": "a"}, stopped, resume=True)
    attempt = store.resumable_attempt(STAGE)
    capsys.readouterr()
    assert main(["status", f"{run_root}/r"]) == 0
    assert re.search(rf'^evaluate +partial +4 .* interrupted in {attempt}: judged so far: base '
                     r'\{"humaneval": \{"pass@1": 0.25\}\}; a rerun with the same config goes on in it$',
                     capsys.readouterr().out, re.M)
    assert main(["status", f"{run_root}/r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluate"] == {
        "state": "partial", "attempt": attempt, "rows_so_far": 4, "judged": {"base": judged["results"]}}


def test_config_written_once_and_history_kept(run_root):
    store = RunStore(run_root, "r")
    store.write_config(load_config("tiny"))
    store.write_config(load_config("tiny"))
    assert listing(store) == ["config.yaml"]
    store.write_config(load_config("tiny", ["seeds.max_lines=30"]))
    assert listing(store) == ["config.1.yaml", "config.yaml"]
    assert store.read_config().seeds.max_lines == 30


def test_status_command_shows_states_and_staleness(run_root, capsys):
    cfg = load_config("tiny")
    store = RunStore(run_root, "r")
    store.write_config(cfg)
    store.run_stage("seeds", {"seeds": cfg.seeds, "run.seed": cfg.run.seed}, {}, write_rows(7))
    run_dir = f"{run_root}/r"
    assert main(["status", run_dir]) == 0
    out = capsys.readouterr().out
    assert "seeds" in out and "done" in out and " 7 " in out
    store.write_config(load_config("tiny", ["run.seed=5"]))
    assert main(["status", run_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"]["rows"] == 7
    assert main(["status", run_dir]) == 0
    assert "config changed: run.seed" in capsys.readouterr().out
    # run order, not alphabetical: influence's feature sub-stages after it, `final` after the iterations
    for name in ("final", "iter_01/features/ckpt_01-candidate", "iter_01/influence", "iter_01/sample", "bootstrap"):
        store.run_stage(name, {}, {}, write_rows(1))
    assert main(["status", run_dir]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["seeds", "bootstrap", "iter_01/sample", "iter_01/influence", "iter_01/features/ckpt_01-candidate",
                     "final"], names


def test_a_section_kept_out_of_the_key_at_its_default_is_still_named_when_changed(run_root, capsys):
    """`prompts.synthesizer` at `default` is not in a stage's key (runs from before it existed keep theirs), but
    `status` names it as the changed section once the config moves off the default."""
    from scoder_ray.config import prompt_sections

    cfg = load_config("tiny")
    store = RunStore(run_root, "r")
    store.write_config(cfg)
    plain = store.run_stage("bootstrap", {"run.seed": cfg.run.seed}, {}, write_rows(3))
    again = store.run_stage("bootstrap", {"run.seed": cfg.run.seed, **prompt_sections(cfg)}, {}, write_rows(3))
    assert again.get("skipped") and again["key"] == plain["key"]  # the same key: nothing redone
    store.run_stage("bootstrap", {"run.seed": cfg.run.seed, **prompt_sections(cfg)}, {}, write_rows(3), force=True)
    changed = load_config("tiny", ["prompts.synthesizer=with_examples"])
    assert store.stale_sections(store.state("bootstrap"), cfg) == []
    assert store.stale_sections(store.state("bootstrap"), changed) == ["prompts.synthesizer"]
    store.write_config(changed)
    assert main(["status", f"{run_root}/r"]) == 0
    assert "config changed: prompts.synthesizer" in capsys.readouterr().out
    assert store.run_stage("bootstrap", {"run.seed": cfg.run.seed, **prompt_sections(changed)}, {}, write_rows(3))["key"] != plain["key"]


def test_status_and_report_refuse_what_is_not_a_run(run_root, capsys):
    assert main(["status", f"{run_root}/no-such-run"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["report", f"{run_root}/no-such-run"]) == 2
    fs, path = filesystem(f"{run_root}/no-such-run")
    assert fs.get_file_info(path).type == pafs.FileType.NotFound  # nothing was created


@pytest.mark.slow  # Arrow retries an endpoint that does not answer for ~9 s, twice here
def test_a_run_root_that_cannot_be_written_is_named_before_any_work(s3_server, tmp_path, capsys):
    """A missing bucket, an endpoint that does not answer, a local root that is a file: one line naming
    run.root and the cause (and for s3:// the endpoint asked), not Arrow's traceback from the first write."""
    check_root(f"s3://{s3_server['bucket']}/probe-{os.getpid()}")  # a good root: written, read, deleted
    fs, path = filesystem(f"s3://{s3_server['bucket']}/probe-{os.getpid()}")
    assert fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)) == []  # no probe left behind
    with pytest.raises(StoreError, match=r"run.root=s3://no-such-bucket/x: cannot write there: .*'no-such-bucket' "
                                         rf"not found.*\(endpoint {s3_server['url']}"):
        check_root("s3://no-such-bucket/x")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match=f"run.root={tmp_path}/a-file/runs: cannot write there"):
        check_root(f"{tmp_path}/a-file/runs")
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing answers
    try:
        with pytest.raises(StoreError, match=r"run.root=s3://scoder-test/x: cannot write there: .*connect.*"
                                             r"\(endpoint http://127.0.0.1:9"):
            check_root("s3://scoder-test/x")
        assert main(["status", "s3://scoder-test/x/run"]) == 2
        assert "s3://scoder-test/x/run: cannot read it: " in capsys.readouterr().err
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved


def test_input_files_on_the_object_store_are_read_and_a_missing_one_is_named(s3_server):
    """teacher.samples_file and score.labels_file may be s3:// objects (a cluster's driver node has no copy of
    the user's files): read as local ones are, bad lines named by URI and line; a missing one is named with its
    key before any work."""
    from scoder_ray.generate.bootstrap import _file_rows
    from scoder_ray.loop import check_input_uris
    from scoder_ray.score.stage import _read_labels

    base = f"s3://{s3_server['bucket']}/inputs-{os.getpid()}"
    write_text(f"{base}/labels.jsonl", '{"cand_id": "a", "label": 3}\n\n{"cand_id": "b", "label": 9}\n')
    write_table(f"{base}/labels.parquet", pa.table({"cand_id": ["a", "b"], "label": [2, 7]}))
    assert _read_labels(f"{base}/labels.jsonl").to_dict("list") == {"cand_id": ["a", "b"], "label": [3.0, 9.0]}
    assert _read_labels(f"{base}/labels.parquet").to_dict("list") == {"cand_id": ["a", "b"], "label": [2.0, 7.0]}
    write_text(f"{base}/bad.jsonl", '{"cand_id": "a", "label": 3}\nnot json\n')
    with pytest.raises(ValueError, match=f"^{base}/bad.jsonl:2: not valid JSON"):
        _read_labels(f"{base}/bad.jsonl")
    write_text(f"{base}/samples.jsonl", json.dumps({"problem": "Add.", "solution": "def f(a, b):\n    return a + b\n"}) + "\n")
    assert [r["problem"] for _, r in _file_rows(f"{base}/samples.jsonl")] == ["Add."]

    cfg = load_config("tiny", [f"teacher.samples_file={base}/samples.jsonl", f"score.labels_file={base}/labels.parquet"])
    check_input_uris(cfg)  # both there
    for key in ("teacher.samples_file", "score.labels_file"):
        missing = load_config("tiny", [f"{key}={base}/nope.jsonl"])  # an object store's are not checked at load
        with pytest.raises(StoreError, match=rf"^{key}={base}/nope.jsonl: no such object; expected a JSONL or "
                                             rf"Parquet file .*\(endpoint {s3_server['url']}"):
            check_input_uris(missing)
    with pytest.raises(StoreError, match=rf"^score.labels_file={base}: a folder"):
        check_input_uris(load_config("tiny", [f"score.labels_file={base}"]))


def test_a_corrupt_done_file_is_named(run_root):
    store = RunStore(run_root, "r")
    store.run_stage("s", {}, {}, write_rows(1))
    write_text(store.uri_of(f"{store.stage_dir('s')}/{DONE}"), "{trunc")
    with pytest.raises(StoreError, match=r"r/s/_DONE\.json is corrupt"):
        store.state("s")


HOLDER = """
import sys, time
from scoder_ray.store import RunStore
store = RunStore(sys.argv[1], "r")
store.acquire_lease(ttl_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(120)
"""


def hold_lease(run_root: str, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_root, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_naming_the_holder(run_root, capsys):
    holder = hold_lease(run_root, 60)
    try:
        with pytest.raises(StoreError, match=rf"held by another driver: host \S+, pid {holder.pid}, Ray job -"):
            RunStore(run_root, "r").acquire_lease(ttl_s=60)
        store = RunStore(run_root, "r")
        store.write_config(load_config("tiny"))
        assert main(["status", f"{run_root}/r"]) == 0
        assert "lease: held — host" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


def test_a_lease_left_by_a_dead_driver_is_taken_over(run_root):
    holder = hold_lease(run_root, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    store = RunStore(run_root, "r")
    lease = store.acquire_lease(ttl_s=60)  # same host, the holder's process is gone: no wait for the ttl
    assert store.read_lease()["pid"] == os.getpid()
    lease.release()
    assert LEASE not in listing(store)


def test_a_lease_whose_heartbeat_stopped_is_taken_over(run_root):
    """A holder on another host cannot be checked by pid: its heartbeat ages past the ttl instead."""
    store = RunStore(run_root, "r")
    write_text(store.file_uri(LEASE), json.dumps({"token": "x", "host": "another-node", "pid": 1, "process_started": 0,
                                                  "ray_job": "raysubmit_old", "heartbeat": time.time() - 5}))
    with pytest.raises(StoreError, match="raysubmit_old"):
        RunStore(run_root, "r").acquire_lease(ttl_s=60)
    write_text(store.file_uri(LEASE), json.dumps({"token": "x", "host": "another-node", "pid": 1, "process_started": 0,
                                                  "ray_job": "raysubmit_old", "heartbeat": time.time() - 61}))
    lease = RunStore(run_root, "r").acquire_lease(ttl_s=60)
    lease.release()


def test_a_driver_that_lost_its_lease_does_not_commit(run_root):
    store = RunStore(run_root, "r")
    lease = store.acquire_lease(ttl_s=30)
    write_text(store.file_uri(LEASE), json.dumps({"token": "other", "host": "n2", "pid": 9, "heartbeat": time.time()}))
    lease._stop.set()
    lease._beat_once()  # what the heartbeat thread does every ttl/3
    with pytest.raises(StoreError, match="taken over by host n2"):
        store.run_stage("s", {}, {}, write_rows(1))
    assert store.read_done("s") is None


def test_damaged_outputs_are_found_and_redone(run_root, capsys):
    cfg = load_config("tiny")
    store = RunStore(run_root, "r")
    store.write_config(cfg)
    calls = []

    def produce(uri):
        calls.append(uri)
        return write_rows(50)(uri)

    done = store.run_stage("s", {"seeds": cfg.seeds}, {}, produce)
    part = f"{store.stage_dir('s')}/{done['attempt']}/data/part-0.parquet"
    assert list(done["manifest"]) == ["data/part-0.parquet"] and store.verify("s", done) == []
    assert main(["status", f"{run_root}/r", "--verify"]) == 0
    assert "every finished stage's files are as written" in capsys.readouterr().out
    if store.local:  # same size, other bytes: only the sha256 (recorded on local roots) sees it
        with open(part, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert main(["status", f"{run_root}/r", "--verify"]) == 1
        out = capsys.readouterr().out
        assert "damaged" in out and "data/part-0.parquet has other bytes than when written" in out
    with store.fs.open_output_stream(part) as f:  # a truncated file: the next run redoes the stage
        f.write(b"PAR1")
    with store.fs.open_output_stream(f"{store.stage_dir('s')}/{done['attempt']}/data/stray.parquet") as f:
        f.write(b"x")
    assert set(store.verify("s", done, hashes=False)) == {"data/part-0.parquet has 4 bytes, "
                                                         f"{done['manifest']['data/part-0.parquet'][0]} when written",
                                                         "data/stray.parquet was not written by the stage"}
    again = store.run_stage("s", {"seeds": cfg.seeds}, {}, produce)
    assert "skipped" not in again and len(calls) == 2 and read_rows(store, "s") == 50
    assert "its output changed since it was written" in capsys.readouterr().out
    assert store.run_stage("s", {"seeds": cfg.seeds}, {}, produce)["skipped"]


def test_input_digests_follow_contents_not_timestamps(run_root):
    """Stage keys hash what an input file says: an edit changes the digest, a rewrite of the same bytes
    (a touch, a copy) does not, and a folder's files count with their names."""
    from scoder_ray.lineage import input_digest

    write_text(f"{run_root}/in/labels.jsonl", '{"cand_id": "a", "label": 3}\n')
    first = input_digest(f"{run_root}/in/labels.jsonl")
    time.sleep(0.01)
    write_text(f"{run_root}/in/labels.jsonl", '{"cand_id": "a", "label": 3}\n')
    assert input_digest(f"{run_root}/in/labels.jsonl") == first
    write_text(f"{run_root}/in/labels.jsonl", '{"cand_id": "a", "label": 4}\n')
    assert input_digest(f"{run_root}/in/labels.jsonl") != first
    folder = input_digest(f"{run_root}/in")
    write_text(f"{run_root}/in/more.jsonl", "")
    assert input_digest(f"{run_root}/in") != folder
    with pytest.raises(FileNotFoundError, match="no/such"):
        input_digest(f"{run_root}/no/such")
