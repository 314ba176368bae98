"""Training stages: tokenize with Ray Data, train on Ray Train's TorchTrainer, write checkpoints.

Stage output (`<stage>/`): tokenized/ (the training rows), ckpt_01/ .. ckpt_M/ (HF model or adapter
folders), checkpoints.json (step and mean lr of each), metrics.jsonl (per step), _DONE.json.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from scoder_ray.config import Config, TrainConf, to_dict
from scoder_ray.store import RunStore, filesystem, read_text
from scoder_ray.tiny import resolve_model
from scoder_ray.train.data import Schedule, check_columns, tokenize_batch

STAGES = {"train_synthesizer": ("synthesizer", "synthesizer"), "train_scoder": ("scoder", "scoder")}
DEFAULT_INPUT = {"train_synthesizer": "bootstrap", "train_scoder": "final"}


def read_rows(uri: str):
    """A Ray Dataset over Parquet or JSONL rows (a file or a folder)."""
    import ray

    jsonl = uri.endswith((".jsonl", ".json", ".jsonl.gz")) or (os.path.isdir(uri) and any(
        f.endswith(".jsonl") for f in os.listdir(uri)))
    return ray.data.read_json(uri) if jsonl else ray.data.read_parquet(uri)


def input_digest(uri: str) -> str:
    """Digest of a data path's files (names, sizes, mtimes): a changed input redoes the stage."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        if i.type == pafs.FileType.File:
            h.update(f"{i.path}\0{i.size}\0{i.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def train_model(conf: TrainConf, model_ref: str, fmt: str, data_uri: str, out_uri: str, cfg: Config,
                name: str) -> dict[str, Any]:
    """Fine-tune `model_ref` on `data_uri` rows into `out_uri`. Input problems fail before any worker starts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scoder_ray.train.worker import train_loop

    model_path = resolve_model(model_ref, cfg.models.cache_dir, cfg.models.tiny_seed)
    rows = read_rows(data_uri)
    check_columns(rows.schema().names, fmt, data_uri)
    n_rows = rows.count()
    if n_rows == 0:
        raise ValueError(f"{data_uri}: the training data is empty")

    tokenized = rows.map_batches(tokenize_batch, fn_kwargs={"model_path": model_path, "fmt": fmt, "max_len": conf.max_len},
                                 batch_format="numpy").materialize()
    usable = tokenized.filter(lambda r: not r["no_response"]).select_columns(["input_ids", "labels", "n_tokens"])
    usable.write_parquet(f"{out_uri}/tokenized")
    stats = tokenized.select_columns(["truncated", "no_response", "n_tokens"]).to_pandas()  # 3 numbers a row
    n_train = int((~stats["no_response"]).sum())
    sequences = n_train if not conf.packing else max(1, int(stats["n_tokens"][~stats["no_response"]].sum()) // conf.max_len)
    Schedule(sequences, conf.num_workers, conf.micro_batch_size, conf.grad_accum, conf.epochs, conf.max_steps,
             cfg.run.seed).check(data_uri)

    use_gpu = conf.gpus_per_worker > 0
    # Ray Train's controller takes one report per worker per poll (default every 2 s) and `report`
    # blocks until then: per-step metrics would cap training at one step per poll. Poll faster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": to_dict(conf), "model_path": model_path, "seed": cfg.run.seed,
                           "tokenized_uri": f"{out_uri}/tokenized", "out_uri": out_uri},
        scaling_config=ScalingConfig(num_workers=conf.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": conf.gpus_per_worker} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(
            name=f"{cfg.run.id}-{name.replace('/', '-')}",
            storage_path=_train_storage(cfg),
            failure_config=FailureConfig(max_failures=conf.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # resumable state only; exports live in the stage
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not use_gpu else None,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    done = json.loads(read_text(f"{out_uri}/checkpoints.json"))
    return {"rows": n_train, "input_rows": n_rows, "truncated": int(stats["truncated"].sum()),
            "dropped_no_response": int(stats["no_response"].sum()), "model": model_ref, "lora": conf.lora.enabled,
            "total_steps": done["total_steps"], "checkpoints": done["checkpoints"], "format": fmt}


def _train_storage(cfg: Config) -> str:
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
        data_uri, inputs = store.uri(upstream) + "/data", {upstream: done["output_digest"]}
    return store.run_stage(stage, {f"train.{section}": conf, "models": cfg.models, "run.seed": cfg.run.seed}, inputs,
                           lambda tmp: train_model(conf, model_ref, fmt, data_uri, tmp, cfg, stage), force=force)
