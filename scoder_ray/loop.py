"""The driver: seeds -> bootstrap -> train synthesizer -> T x (sample -> score -> rank -> warm-up ->
influence -> train data -> retrain) -> final synthesis -> train SCoder -> evaluate -> report.

Every step is a stage of the run store, so `scoder-ray run` on an interrupted run resumes where it
stopped (finished stages with unchanged config and inputs are skipped), and every random choice
derives from run.seed: a run killed at any point and restarted ends with the same dataset digest.
Ray does the heavy lifting inside the stages; the driver passes configs and reads `_DONE.json`s.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from scoder_ray import console
from scoder_ray.config import LABELS_FILE, SAMPLES_FILE, Config
from scoder_ray.evaluate.sandbox import check_isolation
from scoder_ray.evaluate.stage import run_evaluate
from scoder_ray.generate import kept_engines
from scoder_ray.generate.bootstrap import run_bootstrap
from scoder_ray.generate.final import run_final
from scoder_ray.generate.sample import run_sample
from scoder_ray.lineage import current_synthesizer, stopped_after, synthesizer_stage
from scoder_ray.influence.stage import run_influence, run_warmup
from scoder_ray.ray_env import apply_endpoint, check_run_root, init_ray
from scoder_ray.score.stage import WEIGHTS_STAGE, run_fit_weights, run_rank, run_score
from scoder_ray.seeds import run_seeds
from scoder_ray.store import RunStore, check_input_file, check_root
from scoder_ray.train.stage import run_retrain, run_train, run_train_data

StageFn = Callable[[Config, RunStore, bool], dict[str, Any]]


def _influence(t: int) -> StageFn:
    return lambda cfg, store, force: run_influence(cfg, store, t, current_synthesizer(store, t)
                                                   if store.read_done(f"iter_{t:02d}/warmup") else "", force=force)


def empty_reason(store: RunStore, t: int, cfg: Optional[Config] = None) -> str:
    """Why iteration t keeps nothing ('' while it may keep something): no candidate parsed, none survived
    selection, or fewer survived than one optimizer step of the LoRA warm-up (with `cfg`): too few to
    rank by influence, and keeping them unfiltered would skip a filter."""
    it = f"iter_{t:02d}"
    score = store.read_done(f"{it}/score")
    if score is not None and score.get("empty"):
        return score["empty"]
    rank = store.read_done(f"{it}/rank")
    if rank is not None and rank["rows"] == 0:
        return f"{it}/rank: no candidate survived selection (dropped: {rank.get('dropped', {})})"
    if rank is not None and cfg is not None:
        w = cfg.train.warmup
        step = w.num_workers * w.micro_batch_size * w.grad_accum
        if rank["rows"] < step:
            return (f"{it}/rank: {rank['rows']} candidate(s) survived selection, fewer than one optimizer step of "
                    f"the influence warm-up ({w.num_workers} workers x {w.micro_batch_size} micro-batch x "
                    f"{w.grad_accum} accumulation = {step}): too few to rank by influence")
    return ""


def _guarded(t: int, name: str, fn: StageFn) -> StageFn:
    """An iteration stage, unless the loop stopped before iteration t or iteration t keeps nothing: then, as
    loop.on_empty_iteration says, a committed `empty` stage (no data; `stop` marks the train stage), or an
    error. Sampling and scoring always run: they are where an iteration finds out."""
    def run(cfg: Config, store: RunStore, force: bool) -> dict[str, Any]:
        stopped = stopped_after(store, t)
        if stopped:
            return {"rows": 0, "skipped": True, "note": f"the loop stopped after {stopped} (loop.on_empty_iteration=stop)"}
        # The warm-up-size rule is for the stages after rank (rank's own output is what it reads).
        reason = ("" if name.endswith(("/sample", "/score")) else
                  empty_reason(store, t, None if name.endswith("/rank") else cfg))
        if not reason:
            return fn(cfg, store, force)
        mode = cfg.loop.on_empty_iteration
        if mode == "fail":
            raise ValueError(f"{reason}; loop.on_empty_iteration=fail stops the run here (stop: go on to final with "
                             "the synthesizer so far; continue: sample the next iteration with it)")
        last = name.endswith("/train")
        then = (f"the loop stops: final uses {synthesizer_stage(store, t)}'s synthesizer" if mode == "stop" else
                f"iteration {t + 1} samples from {synthesizer_stage(store, t)} again")
        summary = {"rows": 0, "empty": reason, "stop": mode == "stop" and last,
                   "warnings": [f"iteration {t} kept nothing ({reason}); {then} (loop.on_empty_iteration={mode})"] if last else []}
        return store.run_stage(name, {"loop.on_empty_iteration": mode}, {"empty": reason}, lambda tmp: summary, force=force)
    return run


def iteration_stages(t: int) -> dict[str, StageFn]:
    it = f"iter_{t:02d}"
    stages: dict[str, StageFn] = {
        f"{it}/sample": lambda cfg, store, force: run_sample(cfg, store, t, force=force),
        f"{it}/score": lambda cfg, store, force: run_score(cfg, store, t, force=force),
        f"{it}/rank": lambda cfg, store, force: run_rank(cfg, store, t, force=force),
        f"{it}/warmup": lambda cfg, store, force: run_warmup(cfg, store, t, current_synthesizer(store, t), force=force),
        f"{it}/influence": _influence(t),
        f"{it}/train_data": lambda cfg, store, force: run_train_data(cfg, store, t, force=force),
        f"{it}/train": lambda cfg, store, force: run_retrain(cfg, store, t, force=force),
    }
    return {name: _guarded(t, name, fn) for name, fn in stages.items()}


def _fit_weights(cfg: Config, store: RunStore, force: bool) -> dict[str, Any]:
    return run_fit_weights(cfg, store, cfg.score.labels_file, 1, cfg.score.teacher_labels or 200, force=force)


def plan(cfg: Config) -> dict[str, StageFn]:
    """Every stage of the loop, in order."""
    stages: dict[str, StageFn] = {
        "seeds": run_seeds,
        "bootstrap": run_bootstrap,
        "train_synthesizer": lambda cfg, store, force: run_train(cfg, store, "train_synthesizer", force),
    }
    for t in range(1, cfg.loop.iterations + 1):
        for name, fn in iteration_stages(t).items():
            stages[name] = fn
            if name == "iter_01/score" and (cfg.score.labels_file or cfg.score.teacher_labels):
                stages[WEIGHTS_STAGE] = _fit_weights  # w learned before the first ranking, used by every later one
    stages.update({
        "final": run_final,
        "train_scoder": lambda cfg, store, force: run_train(cfg, store, "train_scoder", force),
        "evaluate": run_evaluate,
    })
    return stages


def run_order(names: list[str], cfg: Optional[Config]) -> list[str]:
    """Stage names in the order the loop runs them (influence's feature sub-stages right after it; names
    the plan does not know last), alphabetical without a config."""
    order = {name: i for i, name in enumerate(plan(cfg))} if cfg else {}

    def position(name: str) -> tuple[int, bool, str]:
        parent = name.split("/features/")[0] + "/influence" if "/features/" in name else name
        return order.get(parent, len(order)), parent != name, name

    return sorted(names, key=position)


# Stages runnable alone (`scoder-ray stage NAME`); an iteration's stages for iteration 1 unless
# `--iteration T` (`scoder-ray stage sample --iteration 2` = iter_02/sample).
STAGES: dict[str, StageFn] = {
    "seeds": run_seeds,
    "bootstrap": run_bootstrap,
    "train_synthesizer": lambda cfg, store, force: run_train(cfg, store, "train_synthesizer", force),
    **{name.split("/", 1)[1]: fn for name, fn in iteration_stages(1).items()},
    "final": run_final,
    "train_scoder": lambda cfg, store, force: run_train(cfg, store, "train_scoder", force),
    "evaluate": run_evaluate,
}
SANDBOXED = ("bootstrap", "score", "final", "evaluate")  # the stages that run model-written code


def open_run(cfg: Config) -> RunStore:
    """Ray up, the run root checked for this cluster, the run's lease taken, config.yaml written: what
    every driver does before its first stage."""
    import ray

    init_ray(cfg.ray, apply_endpoint(cfg))
    check_run_root(cfg, sum(1 for n in ray.nodes() if n.get("Alive")))
    check_root(cfg.run.root)
    check_input_uris(cfg)
    store = RunStore.for_config(cfg)
    store.acquire_lease(cfg.run.lease_ttl_s)
    store.write_config(cfg)
    console.attach(store)  # the driver's log (when the CLI captures it) goes to RUN_DIR/logs/ from here on
    return store


def check_input_uris(cfg: Config) -> None:
    """The input files on an object store exist (local ones were checked when the config loaded)."""
    for key, uri, expected in (("teacher.samples_file", cfg.teacher.samples_file, SAMPLES_FILE),
                               ("score.labels_file", cfg.score.labels_file, LABELS_FILE)):
        if uri and "://" in uri:
            check_input_file(key, uri, expected)


def needs_teacher(cfg: Config, store: RunStore) -> bool:
    """Whether this run will still call the teacher: a bootstrap without a samples file that is not done
    yet, or teacher judgements for w that are not fitted yet."""
    return ((not cfg.teacher.samples_file and store.read_done("bootstrap") is None)
            or (bool(cfg.score.teacher_labels) and not cfg.score.labels_file and store.read_done(WEIGHTS_STAGE) is None))


def run_stage(cfg: Config, name: str, force: bool = False, iteration: int = 1) -> dict[str, Any]:
    """One stage; an iteration's stage (sample ... train) of iteration `iteration`."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    per_iteration = iteration_stages(iteration)
    scoped = f"iter_{iteration:02d}/{name}"
    if iteration != 1 and scoped not in per_iteration:
        raise ValueError(f"--iteration applies to an iteration's stages ({', '.join(n.split('/')[1] for n in per_iteration)}), "
                         f"not {name!r}")
    if scoped in per_iteration and not 1 <= iteration <= cfg.loop.iterations:  # seeds, final...: no iteration
        raise ValueError(f"--iteration {iteration}: this run has iterations 1..{cfg.loop.iterations} (loop.iterations)")
    fn = per_iteration.get(scoped, STAGES[name])
    if name in SANDBOXED:
        check_isolation(cfg.evaluate.isolation)
    store = open_run(cfg)
    try:
        return fn(cfg, store, force)
    finally:
        kept_engines.release()
        store.lease.release()


def run(cfg: Config, report: bool = True, until: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Every stage of the loop in order (up to `until`, when given); finished stages with unchanged inputs
    are skipped."""
    stages = plan(cfg)
    if until and until not in stages:
        raise ValueError(f"--until {until!r} is not a stage of this run; its stages: {', '.join(stages)}")
    check_isolation(cfg.evaluate.isolation)  # model-written code runs in every run: refused namespaces end it here
    if needs_teacher(cfg, RunStore(cfg.run.root, cfg.run.id, create=False)):  # before Ray, the lease, any work
        from scoder_ray.generate.teacher import preflight

        preflight(cfg.teacher)
    store = open_run(cfg)
    try:
        return _run(cfg, store, report, stages, until)
    finally:
        kept_engines.release()  # engines end with their stage's run, gracefully (each stops its vLLM engine)
        store.lease.release()


def _run(cfg: Config, store: RunStore, report: bool, stages: dict[str, StageFn],
         until: Optional[str]) -> dict[str, dict[str, Any]]:
    from scoder_ray.metrics import LoopMetrics
    from scoder_ray.tracking import open_tracker

    metrics = LoopMetrics(cfg.run.id, len(stages))
    tracker = open_tracker(cfg, store)
    try:
        return _stages(cfg, store, report, stages, until, metrics, tracker)
    finally:
        if tracker:
            tracker.close()


def _stages(cfg: Config, store: RunStore, report: bool, stages: dict[str, StageFn], until: Optional[str],
            metrics, tracker) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    for i, (name, fn) in enumerate(stages.items()):
        if not name.startswith("iter_") and name != WEIGHTS_STAGE:
            kept_engines.release()  # no stage after the iterations uses the scorer (a stopped loop may have kept it)
        print(f"[scoder-ray] [{i + 1}/{len(stages)}] {name} ...", flush=True)
        done = fn(cfg, store, False)
        results[name] = done
        metrics.record(name, done, i)
        if tracker:
            tracker.stage(i, name, done)
        verb = "skipped (already done)" if done.get("skipped") else f"done in {done.get('seconds', 0):.1f}s"
        print(f"[scoder-ray] [{i + 1}/{len(stages)}] {name}: {verb}, {done.get('rows', 0)} rows "
              f"({time.time() - started:.0f}s elapsed)", flush=True)
        for warning in done.get("warnings", []):
            print(f"[scoder-ray] WARNING {name}: {warning}", flush=True)
        console.sync()
        if name == until:
            print(f"[scoder-ray] stopped after {name} (--until); `run` again to go on", flush=True)
            break
    final = results.get("final", {})
    if final.get("dataset_digest"):
        print(f"[scoder-ray] final dataset: {final['rows']} samples, digest {final['dataset_digest']}", flush=True)
        print(f"[scoder-ray] final dataset at {store.uri('final')}/data  (export: scoder-ray export "
              f"{cfg.run.root}/{cfg.run.id} --format messages|alpaca|sharegpt --out DIR)", flush=True)
    trained = results.get("train_scoder", {})
    if trained.get("checkpoints"):
        print(f"[scoder-ray] SCoder model at {store.uri('train_scoder')}/{trained['checkpoints'][-1]['name']}", flush=True)
    if report:
        from scoder_ray.report import write_report

        path = write_report(store)
        print(f"[scoder-ray] report: {path}", flush=True)
    return results
