"""Wall time of the whole loop, per stage and per iteration, with start-up overhead separated from work.

    .venv/bin/python bench/loop.py [--preset tiny-loop|demo] [key=value ...]

Runs `scoder-ray run` for the preset in a fresh run directory (or reads an existing one: --run-dir), then
prints one row per stage: seconds, share of the total, overhead (vLLM engine start-ups for generation
stages, model load + projection matrix for influence actors, everything but optimizer steps for training
stages) and work, tokens and tokens/s of work; then per-iteration totals. The README's "Scaling" section
derives its estimate from these numbers.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def stage_rows(run: Path) -> list[dict]:
    rows: dict[str, dict] = {}
    for done_file in sorted(run.rglob("_DONE.json"), key=lambda p: json.loads(p.read_text())["started_at"]):
        d = json.loads(done_file.read_text())
        name = d["stage"]
        if "/features/" in name:  # feature shards are the influence stage's work
            name = name.split("/features/")[0] + "/influence"
        overhead = float(d.get("engine_start_s", d.get("actor_start_s", 0.0)))  # vLLM engines / feature actors
        metrics = done_file.parent / "metrics.jsonl"
        tokens = d.get("tokens", 0)
        if metrics.is_file():  # a training stage: work = the optimizer steps
            steps = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            work = sum(s["step_time_s"] for s in steps)
            overhead = max(0.0, d["seconds"] - work)
            tokens = sum(s["tokens"] for s in steps)
        row = rows.setdefault(name, {"stage": name, "seconds": 0.0, "overhead": 0.0, "work": 0.0, "tokens": 0})
        row["seconds"] += d["seconds"]
        row["overhead"] += overhead
        row["work"] += max(0.0, d["seconds"] - overhead)
        row["tokens"] += tokens
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-loop")
    ap.add_argument("--run-dir", help="report on this finished run instead of running one")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.run_dir:
        run = Path(args.run_dir)
    else:
        from scoder_ray.config import load_config
        from scoder_ray.loop import run as run_loop

        root = tempfile.mkdtemp(prefix="bench-loop-")
        cfg = load_config(args.preset, [f"run.root={root}", "run.id=bench", *args.overrides])
        run_loop(cfg, report=False)
        run = Path(root) / "bench"
    rows = stage_rows(run)
    total = sum(r["seconds"] for r in rows)
    print(f"{'stage':<22} {'seconds':>8} {'share':>6} {'overhead':>9} {'work':>8} {'tokens':>9} {'tok/s work':>10}")
    for r in rows:
        tps = f"{r['tokens'] / r['work']:.0f}" if r["tokens"] and r["work"] else ""
        print(f"{r['stage']:<22} {r['seconds']:>8.1f} {100 * r['seconds'] / total:>5.1f}% {r['overhead']:>9.1f} "
              f"{r['work']:>8.1f} {r['tokens']:>9} {tps:>10}")
    print(f"{'total':<22} {total:>8.1f}        {sum(r['overhead'] for r in rows):>9.1f} {sum(r['work'] for r in rows):>8.1f}")
    groups: dict[str, float] = {}
    for r in rows:
        key = r["stage"].split("/")[0] if r["stage"].startswith("iter_") else "setup" if r["stage"] in (
            "seeds", "bootstrap", "train_synthesizer") else "final + scoder + evaluate"
        groups[key] = groups.get(key, 0.0) + r["seconds"]
    print("\nper part: " + ", ".join(f"{k} {v:.0f}s" for k, v in groups.items()))
    final = run / "final" / "_DONE.json"
    if final.is_file():  # the data, not just the clock: what the final dataset holds
        d = json.loads(final.read_text())
        print("final dataset:", json.dumps({k: d.get(k) for k in ("rows", "target", "seeds", "seeds_yielding", "audit",
                                                                   "rejected", "warnings")}))
        a = d.get("audit", {})
        copy_gate_on = "max_seed_similarity: 1.0" not in (run / "config.yaml").read_text()  # off only in tiny-loop
        bad = {k: a[k] for k in ("placeholders", "prompt_echoes") + (("seed_copies",) if copy_gate_on else ()) if a.get(k)}
        if bad:  # a fast loop that makes placeholders is a failing loop
            raise SystemExit(f"FAIL: the final dataset holds {bad}: the quality gates let them through")
    print(json.dumps({"run": str(run), "total_s": round(total, 1),
                      "overhead_share": round(sum(r["overhead"] for r in rows) / total, 3)}))


if __name__ == "__main__":
    main()
