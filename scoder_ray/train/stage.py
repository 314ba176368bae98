"""Training stages: tokenize with Ray Data, train on Ray Train's TorchTrainer, write checkpoints.

Stage output (`<stage>/`): tokenized/ (the training rows), validation/ (the rows `val_size` holds out, if any),
ckpt_01/ .. ckpt_M/ (HF model or adapter folders), checkpoints.json (step, mean lr and held-out loss of each),
metrics.jsonl (per step; `eval_loss` where the held-out rows were evaluated), _DONE.json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from scoder_ray.config import Config, TrainConf, prompt_sections, to_dict
from scoder_ray.lineage import current_synthesizer, input_digest, synthesizer_digest
from scoder_ray.prompts import instruction
from scoder_ray.store import RunStore, filesystem, read_text
from scoder_ray.train.data import Schedule, check_columns, tokenize_batch, validation_count

STAGES = {"train_synthesizer": ("synthesizer", "synthesizer"), "train_scoder": ("scoder", "scoder")}
DEFAULT_INPUT = {"train_synthesizer": "bootstrap", "train_scoder": "final"}


def read_rows(uri: str):
    """A Ray Dataset over Parquet or JSONL rows (a file or a folder). A local path is read here, on the
    driver's node, where it exists: Ray Data's read tasks may run on any node of the cluster."""
    import pyarrow.dataset as pads
    import ray

    jsonl = uri.endswith((".jsonl", ".json", ".jsonl.gz")) or (os.path.isdir(uri) and any(
        f.endswith(".jsonl") for f in os.listdir(uri)))
    if "://" not in uri:
        return ray.data.from_arrow(pads.dataset(uri, format="json" if jsonl else "parquet").to_table())
    return ray.data.read_json(uri) if jsonl else ray.data.read_parquet(uri)


def train_model(conf: TrainConf, model_ref: str, fmt: str, data_uri: str, out_uri: str, cfg: Config,
                name: str) -> dict[str, Any]:
    """Fine-tune `model_ref` on `data_uri` rows into `out_uri`. Input problems fail before any worker starts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scoder_ray.train.worker import train_loop

    rows = read_rows(data_uri)
    check_columns(rows.schema().names, fmt, data_uri)
    n_rows = rows.count()
    if n_rows == 0:
        raise ValueError(f"{data_uri}: the training data is empty")

    # The model is a reference (builtin:, hf:, a run-root URI or a local folder) that every task and worker
    # resolves on its own node (model_cache.local_model): no path of the driver's node is assumed elsewhere.
    tokenized = rows.map_batches(tokenize_batch, fn_kwargs={"model_path": model_ref, "fmt": fmt, "max_len": conf.max_len,
                                                            "models": cfg.models, "seed": cfg.run.seed,
                                                            "instruction": instruction(cfg.prompts.synthesizer)},
                                 batch_format="numpy").materialize()
    stats = tokenized.select_columns(["truncated", "no_response", "n_tokens", "key"]).to_pandas()  # 4 numbers a row
    usable_keys = stats["key"][~stats["no_response"]]
    n_val = validation_count(conf.val_size, len(usable_keys))
    if n_val >= len(usable_keys):
        raise ValueError(f"{name}: val_size={conf.val_size:g} holds out {n_val} of the {len(usable_keys)} rows with a "
                         "response, leaving none to train on")
    # The rows with the n_val smallest seeded keys are held out (ties, i.e. identical rows, go together).
    cut = int(usable_keys.nsmallest(n_val).max()) if n_val else -1
    usable = tokenized.filter(lambda r: not r["no_response"])
    columns = ["input_ids", "labels", "n_tokens"]
    usable.filter(lambda r: r["key"] > cut).select_columns(columns).write_parquet(f"{out_uri}/tokenized")
    if n_val:
        usable.filter(lambda r: r["key"] <= cut).select_columns(columns).write_parquet(f"{out_uri}/validation")
    trained = ~stats["no_response"] & (stats["key"] > cut)
    n_train, n_val = int(trained.sum()), int((~stats["no_response"] & (stats["key"] <= cut)).sum())
    sequences = n_train if not conf.packing else max(1, int(stats["n_tokens"][trained].sum()) // conf.max_len)
    Schedule(sequences, conf.num_workers, conf.micro_batch_size, conf.grad_accum, conf.epochs, conf.max_steps,
             cfg.run.seed).check(data_uri + (f" (less the {n_val} rows held out by val_size)" if n_val else ""))

    use_gpu = conf.gpus_per_worker > 0
    # One Ray Train run per attempt of the stage (the attempt's folder is in the name): worker failures
    # resume inside it, but a new attempt (a rerun after the driver died, --force, a changed config) starts
    # clean instead of resuming a run whose exports were in an attempt folder that no longer exists.
    attempt = out_uri.rstrip("/").rsplit("-", 1)[-1][:8]
    run_name = f"{cfg.run.id}-{name.replace('/', '-')}-{attempt}"
    # Ray Train's controller takes one report per worker per poll (default every 2 s) and `report`
    # blocks until then: per-step metrics would cap training at one step per poll. Poll faster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": to_dict(conf), "model_ref": model_ref, "models": cfg.models, "seed": cfg.run.seed,
                           "tokenized_uri": f"{out_uri}/tokenized", "out_uri": out_uri, "stage": name,
                           "val_uri": f"{out_uri}/validation" if n_val else None},
        scaling_config=ScalingConfig(num_workers=conf.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": conf.gpus_per_worker} if use_gpu else {"CPU": 1},
                                     accelerator_type=(cfg.ray.accelerator_type or None) if use_gpu else None),
        run_config=RunConfig(
            name=run_name,
            storage_path=_train_storage(cfg),
            failure_config=FailureConfig(max_failures=conf.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # resumable state only; exports live in the stage
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not use_gpu else None,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    _delete_tree(f"{_train_storage(cfg)}/{run_name}")  # resumable state of a finished run: no longer needed
    done = json.loads(read_text(f"{out_uri}/checkpoints.json"))
    evals = [(m["step"], m["eval_loss"]) for m in map(json.loads, read_text(f"{out_uri}/metrics.jsonl").splitlines())
             if "eval_loss" in m]
    out = {"rows": n_train, "input_rows": n_rows, "truncated": int(stats["truncated"].sum()),
           "dropped_no_response": int(stats["no_response"].sum()), "model": model_ref, "lora": conf.lora.enabled,
           "total_steps": done["total_steps"], "checkpoints": done["checkpoints"], "format": fmt,
           "loaded": done.get("loaded", {}), "padding": done.get("padding"), "val_rows": n_val}
    if evals:
        best = min(evals, key=lambda e: e[1])
        out.update(eval_loss=evals[-1][1], best_eval={"step": best[0], "loss": best[1]},
                   warnings=[w for w in [overfit_warning(evals, n_train, done["checkpoints"])] if w])
    return out


def overfit_warning(evals: list[tuple[int, float]], rows: int, checkpoints: Optional[list[dict]] = None,
                    rise: float = 0.02) -> str:
    """In words, when the held-out loss ended more than `rise` above its lowest: the later steps fitted the
    training rows at the expense of unseen ones. Names the exported checkpoint with the lowest held-out loss
    where that is not the last one."""
    step, low = min(evals, key=lambda e: e[1])
    last_step, last = evals[-1]
    if last <= low * (1 + rise):
        return ""
    scored = [c for c in checkpoints or [] if c.get("eval_loss") is not None]
    best = min(scored, key=lambda c: c["eval_loss"]) if scored else None
    better = (f"; of the exported checkpoints {best['name']} (step {best['step']}) has the lowest, "
              f"{best['eval_loss']:.4f}" if best and best is not scored[-1] else "")
    return (f"the held-out loss rose from {low:.4f} at step {step} to {last:.4f} at the last step {last_step} "
            f"(+{last / low - 1:.0%}): the model overfits its {rows} training rows; fewer epochs, a lower lr or "
            f"more data would help{better}")


def _delete_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def _train_storage(cfg: Config) -> str:
    """Ray Train's storage_path: inside the run root, so a worker group restarted on any node resumes from
    the checkpoint there (an object store, or a local root on one machine or a shared mount)."""
    root = cfg.run.root if "://" in cfg.run.root else os.path.abspath(os.path.expanduser(cfg.run.root))
    return f"{root}/{cfg.run.id}/_ray_train"


def run_train(cfg: Config, store: RunStore, stage: str, force: bool = False, data: Optional[str] = None) -> dict[str, Any]:
    """`train_synthesizer` / `train_scoder` through the run store."""
    section, fmt = STAGES[stage]
    conf: TrainConf = getattr(cfg.train, section)
    model_ref = cfg.models.synthesizer if section == "synthesizer" else cfg.models.scoder
    data_uri = data or conf.data
    if data_uri:
        inputs = {"data": input_digest(data_uri)}
    else:
        upstream = DEFAULT_INPUT[stage]
        done = store.read_done(upstream)
        if done is None:
            raise ValueError(f"{stage} needs training rows: run the {upstream} stage first, or set "
                             f"train.{section}.data=PATH (Parquet/JSONL with {', '.join(('snippet', 'problem', 'solution') if fmt == 'synthesizer' else ('problem', 'solution'))})")
        if upstream == "bootstrap" and done["rows"] == 0:  # say why, not "the training data is empty"
            from scoder_ray.generate.bootstrap import nothing_kept

            raise ValueError(f"{stage}: {nothing_kept(done, store.uri(upstream) + '/rejected')}")
        data_uri, inputs = store.uri(upstream) + "/data", {upstream: done["output_digest"]}
    sections = {f"train.{section}": conf, "models": cfg.models, "run.seed": cfg.run.seed,
                **(prompt_sections(cfg) if fmt == "synthesizer" else {})}
    return store.run_stage(stage, sections, inputs,
                           lambda tmp: train_model(conf, model_ref, fmt, data_uri, tmp, cfg, stage), force=force)


def run_train_data(cfg: Config, store: RunStore, iteration: int, force: bool = False) -> dict[str, Any]:
    """`iter_TT/train_data`: the teacher samples plus every candidate kept by influence in iterations 1..T."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from scoder_ray.quality import diversity, narrowing_warning
    from scoder_ray.store import write_table

    sources = ["bootstrap"] + [f"iter_{t:02d}/influence" for t in range(1, iteration + 1)]
    dones = {s: store.read_done(s) for s in sources}
    missing = [s for s, d in dones.items() if d is None]
    if missing:
        raise ValueError(f"iter_{iteration:02d}/train_data needs {', '.join(missing)}: run them first")
    sources = [s for s in sources if not dones[s].get("empty")]  # an iteration that kept nothing adds nothing

    def produce(tmp: str) -> dict[str, Any]:
        rows, counts = [], {}
        for s in sources:
            fs, path = filesystem(store.uri(s) + "/data")
            table = pq.read_table(path, filesystem=fs)
            if "kept" in table.column_names:
                table = table.filter(pc.field("kept"))
            origin = "teacher" if s == "bootstrap" else s.split("/")[0]
            part = [{"snippet": r["snippet"], "problem": r["problem"], "solution": r["solution"],
                     "lang": r.get("lang") or "python", "origin": origin}
                    for r in table.select([c for c in ("snippet", "problem", "solution", "lang")
                                           if c in table.column_names]).to_pylist()]
            counts[origin] = len(part)
            rows += part
        rows.sort(key=lambda r: (r["origin"] != "teacher", r["origin"], r["problem"], r["solution"], r["snippet"]))
        write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(rows, schema=pa.schema(
            [(c, pa.string()) for c in ("snippet", "problem", "solution", "lang", "origin")])))
        # This iteration's kept samples beside the teacher's: a synthesizer narrowing to a few templates shows here
        it = f"iter_{iteration:02d}"
        div = diversity([r["problem"] for r in rows if r["origin"] == it],
                        [r["problem"] for r in rows if r["origin"] == "teacher"], seed=cfg.run.seed)
        return {"rows": len(rows), "by_origin": counts, "diversity": div,
                "warnings": narrowing_warning(div, f"{it}'s kept samples", cfg.quality.min_diversity_ratio)}

    return store.run_stage(f"iter_{iteration:02d}/train_data", {}, {s: d["output_digest"] for s, d in dones.items()},
                           produce, force=force)


def retrain_start(cfg: Config, store: RunStore, iteration: int) -> tuple[str, str]:
    """The model `iter_TT/train` starts from, and the digest of the stage that wrote it ('' for the base model):
    models.synthesizer (loop.retrain_from=base) or the last checkpoint of the synthesizer iteration T sampled."""
    if cfg.loop.retrain_from == "previous":
        return current_synthesizer(store, iteration), synthesizer_digest(store, iteration)
    return cfg.models.synthesizer, ""


def run_retrain(cfg: Config, store: RunStore, iteration: int, force: bool = False) -> dict[str, Any]:
    """`iter_TT/train`: the next synthesizer, from the base model (loop.retrain_from=base) or the one this
    iteration sampled from (previous), on `iter_TT/train_data`; its checkpoints feed iteration T+1."""
    from dataclasses import replace


    data_stage = f"iter_{iteration:02d}/train_data"
    data = store.read_done(data_stage)
    if data is None:
        raise ValueError(f"iter_{iteration:02d}/train needs {data_stage}: run it first")
    conf = cfg.train.synthesizer
    conf = replace(conf, epochs=cfg.loop.retrain_epochs or conf.epochs, lr=cfg.loop.retrain_lr or conf.lr, data=None)
    model_ref, previous_digest = retrain_start(cfg, store, iteration)
    inputs = {data_stage: data["output_digest"], "from": cfg.loop.retrain_from, "previous": previous_digest}
    stage = f"iter_{iteration:02d}/train"
    sections = {"train.synthesizer": cfg.train.synthesizer, "loop.retrain_epochs": cfg.loop.retrain_epochs,
                "loop.retrain_lr": cfg.loop.retrain_lr,
                "models": cfg.models, "run.seed": cfg.run.seed, **prompt_sections(cfg)}
    return store.run_stage(stage, sections, inputs,
                           lambda tmp: train_model(conf, model_ref, "synthesizer", store.uri(data_stage) + "/data", tmp,
                                                   cfg, stage), force=force)
