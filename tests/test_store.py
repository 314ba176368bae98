import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoder_ray.cli import main
from scoder_ray.config import load_config
from scoder_ray.store import DONE, RunStore


def write_rows(n):
    def produce(tmp_uri):
        os.makedirs(f"{tmp_uri}/data")
        pq.write_table(pa.table({"x": list(range(n))}), f"{tmp_uri}/data/part-0.parquet")
        return {"rows": n}
    return produce


def test_stage_runs_once_then_skips(tmp_path):
    store = RunStore(str(tmp_path), "r")
    cfg = load_config("tiny")
    calls = []

    def produce(tmp):
        calls.append(tmp)
        return write_rows(3)(tmp)

    first = store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, produce)
    assert first["rows"] == 3 and "skipped" not in first
    second = store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, produce)
    assert second["skipped"] and second["key"] == first["key"] and len(calls) == 1
    assert pq.read_table(tmp_path / "r" / "s" / "data").num_rows == 3
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp-" in p]


@pytest.mark.parametrize("change", ["config", "inputs"])
def test_stale_stage_is_redone(tmp_path, change):
    store = RunStore(str(tmp_path), "r")
    cfg = load_config("tiny")
    store.run_stage("s", {"seeds": cfg.seeds}, {"in": "a"}, write_rows(3))
    assert store.state("s", store.stage_key({"seeds": cfg.seeds}, {"in": "a"})).state == "done"
    cfg2 = load_config("tiny", ["seeds.max_lines=39"]) if change == "config" else cfg
    inputs2 = {"in": "b"} if change == "inputs" else {"in": "a"}
    assert store.state("s", store.stage_key({"seeds": cfg2.seeds}, inputs2)).state == "stale"
    again = store.run_stage("s", {"seeds": cfg2.seeds}, inputs2, write_rows(5))
    assert "skipped" not in again and again["rows"] == 5
    assert pq.read_table(tmp_path / "r" / "s" / "data").num_rows == 5  # no leftover of the old output


def test_nested_stage_names(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.run_stage("iter_01/sample", {}, {}, write_rows(2))
    assert [s.name for s in store.stages()] == ["iter_01/sample"]
    assert (tmp_path / "r" / "iter_01" / "sample" / DONE).is_file()


def test_a_failing_stage_leaves_nothing_that_counts(tmp_path):
    store = RunStore(str(tmp_path), "r")

    def boom(tmp):
        write_rows(1)(tmp)
        raise RuntimeError("bad row")

    with pytest.raises(RuntimeError):
        store.run_stage("s", {}, {}, boom)
    assert store.state("s").state == "partial" and store.read_done("s") is None
    assert store.run_stage("s", {}, {}, write_rows(2))["rows"] == 2
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp-" in p]


def test_stage_killed_mid_write_is_redone(tmp_path):
    """SIGKILL while the stage writes: no _DONE.json, no final folder; the rerun completes cleanly."""
    script = textwrap.dedent(f"""
        import os, time, pyarrow as pa, pyarrow.parquet as pq
        from scoder_ray.store import RunStore
        def produce(tmp):
            os.makedirs(tmp + "/data")
            pq.write_table(pa.table({{"x": [1]}}), tmp + "/data/part-0.parquet")
            open({str(tmp_path / 'started')!r}, "w").close()
            time.sleep(60)
            return {{"rows": 1}}
        RunStore({str(tmp_path)!r}, "r").run_stage("s", {{}}, {{}}, produce)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = RunStore(str(tmp_path), "r")
    assert store.read_done("s") is None and not (tmp_path / "r" / "s").exists()
    assert store.state("s").state == "partial"
    assert [s.state for s in store.stages()] == ["partial"]
    done = store.run_stage("s", {}, {}, write_rows(4))
    assert done["rows"] == 4 and store.state("s").state == "done"
    assert sorted(os.listdir(tmp_path / "r")) == ["s"]


def test_config_written_once_and_history_kept(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.write_config(load_config("tiny"))
    store.write_config(load_config("tiny"))
    assert sorted(os.listdir(tmp_path / "r")) == ["config.yaml"]
    store.write_config(load_config("tiny", ["seeds.max_lines=30"]))
    assert sorted(os.listdir(tmp_path / "r")) == ["config.1.yaml", "config.yaml"]
    assert store.read_config().seeds.max_lines == 30


def test_status_command_shows_states_and_staleness(tmp_path, capsys):
    cfg = load_config("tiny")
    store = RunStore(str(tmp_path), "r")
    store.write_config(cfg)
    store.run_stage("seeds", {"seeds": cfg.seeds, "run.seed": cfg.run.seed}, {}, write_rows(7))
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "seeds" in out and "done" in out and " 7 " in out
    store.write_config(load_config("tiny", ["run.seed=5"]))
    assert main(["status", str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"]["rows"] == 7
    assert main(["status", str(tmp_path / "r")]) == 0
    assert "config changed: run.seed" in capsys.readouterr().out
