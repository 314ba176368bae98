"""The run report and the final dataset digest, on a run store with real stage folders (no Ray)."""
import json
import re

import pyarrow as pa

from scoder_ray.generate.final import dataset_digest
from scoder_ray.report import write_report
from scoder_ray.seeds import documented_functions, resolve_rows_file
from scoder_ray.store import RunStore, write_table, write_text


def test_dataset_digest_depends_on_content_not_order():
    rows = [{"problem": "p1", "solution": "s1"}, {"problem": "p2", "solution": "s2"}]
    assert dataset_digest(rows) == dataset_digest(rows[::-1])
    assert dataset_digest(rows) != dataset_digest([rows[0], {"problem": "p2", "solution": "s2 "}])


def test_report_has_plots_tables_and_config(tmp_path):
    store = RunStore(str(tmp_path), "r")
    write_text(store.file_uri("config.yaml"), "run:\n  id: r\n")

    def scored(tmp):
        write_table(f"{tmp}/data/part-0.parquet", pa.table({"cand_id": ["a", "b"], "aspect_clarity": [3, 7],
                                                            "aspects_fallback": [False, False]}))
        return {"rows": 2}

    def influence(tmp):
        write_table(f"{tmp}/data/part-0.parquet", pa.table({"influence": [0.1, 0.5], "kept": [False, True]}))
        return {"rows": 1, "candidates": 2}

    def trained(tmp):
        write_text(f"{tmp}/metrics.jsonl", "".join(json.dumps({"step": i, "loss": 2.0 / i, "step_time_s": 0.1,
                                                               "tokens": 100}) + "\n" for i in range(1, 5)))
        return {"rows": 3}

    store.run_stage("iter_01/sample", {}, {}, lambda tmp: {"rows": 4, "parse_rate": 0.5, "tokens": 400,
                                                            "pools": {"ckpt_01": [100.0, 130.0], "ckpt_02": [101.0, 128.5]}})
    store.run_stage("iter_01/score", {}, {}, scored)
    store.run_stage("iter_01/influence", {}, {}, influence)
    store.run_stage("iter_01/train", {}, {}, trained)
    store.run_stage("final", {}, {}, lambda tmp: {"rows": 1, "target": 2, "dataset_digest": "abc"})
    store.run_stage("evaluate", {}, {}, lambda tmp: {"rows": 2, "results": {"base": {"humaneval": {"pass@1": 0.0}},
                                                                           "scoder": {"humaneval": {"pass@1": 0.5}}}})
    html = open(write_report(store)).read()
    assert html.count("data:image/png;base64,") == 4  # durations, engine pools, iteration distributions, losses
    assert "<h3>Engine pools</h3>" in html
    for text in ("Iterations", "iter_01", "pass@1=0.500", "abc", "run:\n  id: r", "Plan beside measured"):
        assert text in html
    assert re.search(r"<td>iter_01/train</td><td>[^<]+</td><td>[^<]+</td><td>0\.\d{3}</td>", html)  # measured
    assert re.search(r"<td>train_scoder</td>(<td>[^<]+</td>){2}<td>not run</td>", html)


def test_builtin_rows_file_is_written_once(tmp_path):
    path = resolve_rows_file("builtin:stdlib-documented:5", str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert rows == documented_functions(5)
    assert resolve_rows_file("builtin:stdlib-documented:5", str(tmp_path)) == path
    assert resolve_rows_file("other.jsonl", str(tmp_path)) == "other.jsonl"
