"""The execution aspect: a candidate's solution, and the examples its problem states, run in the sandbox.

Examples are the `assert ...` lines of the problem statement (inside or outside code fences) that
compile on their own; the solution itself runs as a module (its own asserts and `__main__` block too).
Examples of the form `assert f(x) == <literal>` are judged here from the values the program reports
(checks.py); others run in the program's process.
Verdict `passed` scores 9, anything else 0; with `score.exec_filter` a failing candidate is not kept.
"""
from __future__ import annotations

import ast
import re

import numpy as np

from scoder_ray.evaluate.checks import CheckedTests, NotCheckable, from_asserts
from scoder_ray.evaluate.sandbox import Limits, Sandbox

_ASSERT = re.compile(r"^\s*(?:>>>\s*)?(assert\b.+)$", re.MULTILINE)


def stated_examples(problem: str) -> str:
    """The problem's `assert` lines that are valid Python, as test code ('' if none)."""
    lines = []
    for m in _ASSERT.finditer(problem):
        line = m.group(1).strip().rstrip("`")
        try:
            ast.parse(line)
        except SyntaxError:
            continue
        lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


def examples_tests(problem: str) -> "str | CheckedTests":
    """The stated examples as checks decided outside the program where each is `assert <call> <op> <literal>`
    (or a bare call, or abs/isclose), else as test code the program runs itself."""
    code = stated_examples(problem)
    try:
        return from_asserts(code, "")
    except NotCheckable:
        return code


_SANDBOXES: dict[tuple[float, int, str], tuple[Sandbox, Limits]] = {}


def execute_batch(batch: dict[str, np.ndarray], timeout_s: float, workers: int,
                  isolation: str = "full") -> dict[str, np.ndarray]:
    """Ray Data task function: adds `exec_verdict`, `exec_reason` and `exec_decided` (outside | in-process). A task, not an actor, so it never
    holds a CPU that the stage's readers need; the worker process keeps its warm sandbox between tasks."""
    key = (timeout_s, workers, isolation)
    if key not in _SANDBOXES:
        # site_packages: generated code may import numpy & co.
        _SANDBOXES[key] = (Sandbox(workers=workers, site_packages=True, isolation=isolation),
                           Limits(timeout_s=timeout_s, cpu_seconds=max(1, int(timeout_s))))
    sandbox, limits = _SANDBOXES[key]
    pairs = [(sol, examples_tests(prob)) for sol, prob in zip(batch["solution"], batch["problem"])]
    verdicts = sandbox.run_batch(pairs, limits)
    result = dict(batch)
    result["exec_verdict"] = np.array([v.status for v in verdicts], dtype=object)
    result["exec_reason"] = np.array([v.reason[:200] for v in verdicts], dtype=object)
    result["exec_decided"] = np.array([v.extra.get("decided", "") for v in verdicts], dtype=object)
    return result


def execute_table(table, out_uri: str, timeout_s: float, workers: int, isolation: str = "full") -> int:
    """A Ray task: `execute_batch` over one scored block, written to `out_uri` (one Parquet file); its rows."""
    from scoder_ray.ray_env import batch_to_table, table_to_batch
    from scoder_ray.store import write_table

    write_table(out_uri, batch_to_table(execute_batch(table_to_batch(table), timeout_s, workers, isolation)))
    return table.num_rows


def sandbox_verdicts(ids: list[str], problems: list[str], solutions: list[str], timeout_s: float, workers: int,
                     isolation: str = "full") -> dict[str, tuple[str, str]]:
    """(verdict, reason) per id: each solution with the examples its problem states, in Ray Data tasks, so on a
    cluster the worker nodes run the sandboxes, not the driver's node. Needs Ray initialised."""
    import pandas as pd
    import ray

    if not ids:
        return {}
    rows = pd.DataFrame({"id": ids, "problem": problems, "solution": solutions})
    ran = ray.data.from_pandas(rows).map_batches(
        execute_batch, fn_kwargs={"timeout_s": timeout_s, "workers": workers, "isolation": isolation},
        batch_size=32, num_cpus=1, batch_format="numpy")
    out = ran.select_columns(["id", "exec_verdict", "exec_reason"]).to_pandas()
    return {i: (v, r) for i, v, r in zip(out["id"], out["exec_verdict"], out["exec_reason"])}
