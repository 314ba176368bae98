"""The run report and the final dataset digest, on a run store with real stage folders (no Ray)."""
import json
import re

import pyarrow as pa

from scoder_ray.generate.final import dataset_digest
from scoder_ray.report import write_report
from scoder_ray.seeds import documented_functions, resolve_rows_file
from scoder_ray.store import RunStore, write_table, write_text
from scoder_ray.train.stage import overfit_warning


def test_dataset_digest_depends_on_content_not_order():
    rows = [{"problem": "p1", "solution": "s1"}, {"problem": "p2", "solution": "s2"}]
    assert dataset_digest(rows) == dataset_digest(rows[::-1])
    assert dataset_digest(rows) != dataset_digest([rows[0], {"problem": "p2", "solution": "s2 "}])


def small_run(tmp_path) -> RunStore:
    """A run store with one iteration's stages, a training run, final and evaluate."""
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
        held_out = {2: 1.0, 4: 1.2}  # train.*.val_size: evaluated at steps 2 and 4, and rising
        write_text(f"{tmp}/metrics.jsonl", "".join(json.dumps({"step": i, "loss": 2.0 / i, "step_time_s": 0.1,
                                                               "tokens": 100, "tokens_per_s": 1000.0 * i,
                                                               **({"eval_loss": held_out[i]} if i in held_out else {})})
                                                   + "\n" for i in range(1, 5)))
        return {"rows": 3, "padding": 0.125, "val_rows": 2, "eval_loss": 1.2, "best_eval": {"step": 2, "loss": 1.0},
                "warnings": [overfit_warning(list(held_out.items()), 3)]}

    store.run_stage("bootstrap", {}, {}, lambda tmp: {"rows": 3, "teacher": {"model": "gpt-4o"}, "estimated_cost_usd": 0.0125,
                                                      "usage": {"requests_sent": 5, "cache_hits": 2, "retries": 1,
                                                                "errors": {"HTTP 429": 1}, "prompt_tokens_paid": 3000,
                                                                "completion_tokens_paid": 500},
                                                      "price": {"in_per_mtok": 2.5, "out_per_mtok": 10.0,
                                                                "source": "list price of gpt-4o"},
                                                      "execution": {"ran": 5, "passed": 3, "with_examples": 2}})
    store.run_stage("iter_01/sample", {}, {}, lambda tmp: {"rows": 4, "parse_rate": 0.5, "tokens": 400, "resumed_rows": 3,
                                                            "pools": {"ckpt_01": [100.0, 130.0, 3], "ckpt_02": [101.0, 128.5, 3]},
                                                            "gpus": {"peak": 6, "total": 8, "trace": [[0, 6]]}})
    store.run_stage("iter_01/score", {}, {}, scored)
    store.run_stage("iter_01/influence", {}, {}, influence)
    store.run_stage("iter_01/train", {}, {}, trained)
    store.run_stage("final", {}, {}, lambda tmp: {"rows": 1, "target": 2, "dataset_digest": "abc", "diversity": {
        "k": 64, "distinct_3": 0.41, "teacher_distinct_3": 0.9, "ratio": 0.4556}})
    store.run_stage("evaluate", {}, {}, lambda tmp: {"rows": 2, "results": {"base": {"humaneval": {"pass@1": 0.0}},
                                                                           "scoder": {"humaneval": {"pass@1": 0.5}}}})
    return store


CHARTS = 4  # durations, engine pools, iteration distributions, loss curves


def test_report_has_plots_tables_and_config(tmp_path):
    store = small_run(tmp_path)
    html = open(write_report(store)).read()
    assert html.count('class="plotly-graph-div"') == CHARTS
    assert not re.search(r"<script[^>]* src=", html) and "Plotly.newPlot" in html  # plotly.js inlined: opens offline
    # A resumed stage: its rows say so, and no tokens/s (its tokens include the interrupted attempt's)
    assert re.search(r"<td>iter_01/sample</td><td>4 \(resumed: 3 rows written before an interruption\)</td>"
                     r"<td>[\d.]+</td><td></td><td></td>", html)
    assert "<h3>Pools</h3>" in html and "iter_01\\u002fsample ckpt_02 x3" in html  # (Plotly escapes "/" in its JSON)
    assert "GPUs held at most while the pools ran: iter_01/sample: 6 of 8." in html
    assert re.search(r"<h2>Teacher</h2>.*<td>gpt-4o</td><td>5</td><td>2</td><td>1</td>.*\$0\.0125.*list price of gpt-4o.*<td>3 of 5</td>", html)
    for text in ("Iterations", "iter_01", "pass@1=0.500", "abc", "run:\n  id: r", "Plan beside measured",
                 "0.41 / 0.90 (ratio 0.46, 64 problems each)"):
        assert text in html
    assert re.search(r"<td>iter_01/train</td><td>[^<]+</td><td>[^<]+</td><td>0\.\d{3}</td>", html)  # measured
    assert re.search(r"<td>train_scoder</td>(<td>[^<]+</td>){2}<td>not run</td>", html)
    # per training run: steps, rows, last loss, held-out loss, mean tokens/s, padding; the held-out curve, and
    # its rise among the warnings
    assert ("<td>iter_01/train</td><td>4</td><td>3</td><td>0.5000</td><td>1.2000 (2 rows); lowest 1.0000 at step 2"
            "</td><td>2,500</td><td>12.5%</td>") in html
    assert '"name":"held-out"' in html and '"y":[1.0,1.2]' in html
    assert re.search(r"<b>iter_01/train</b>: the held-out loss rose from 1\.0000 at step 2 to 1\.2000", html)


def test_builtin_rows_file_is_written_once(tmp_path):
    path = resolve_rows_file("builtin:stdlib-documented:5", str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert rows == documented_functions(5)
    assert resolve_rows_file("builtin:stdlib-documented:5", str(tmp_path)) == path
    assert resolve_rows_file("other.jsonl", str(tmp_path)) == "other.jsonl"


def test_the_report_draws_its_charts_in_a_headless_browser(tmp_path):
    """Chromium from the OS packages (make setup installs it) opens report.html offline, runs its scripts and
    draws every chart; `scoder-ray report --screenshot` keeps the picture as RUN_DIR/report.png."""
    from scoder_ray.cli import main
    from scoder_ray.report import render

    small_run(tmp_path)
    assert main(["report", str(tmp_path / "r"), "--screenshot"]) == 0
    dom = render(str(tmp_path / "r" / "report.html"))
    assert dom.count('class="main-svg"') >= CHARTS  # Plotly drew an SVG per chart (more: its hover layers)
    assert dom.count('class="plotly-graph-div') >= CHARTS and "iter_01/train" in dom
    assert re.search(r'class="trace bars"', dom) and re.search(r'class="scatterlayer', dom)  # bars and loss lines
    png = (tmp_path / "r" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000, len(png)
