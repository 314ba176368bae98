"""Influence stages of iteration T (each through the run store):

- `iter_TT/warmup`: a LoRA warm-up of the current synthesizer (train.warmup) on every teacher sample plus
  a random `influence.warmup_fraction` of the selected candidates; K checkpoints with Adam moments.
- `iter_TT/features/<ckpt>-<kind>`: projected gradient features of the candidates (Adam direction) or
  the references (teacher samples, plain gradient) at one checkpoint, fp16, computed by a Ray Data pool
  of `influence.num_actors` stateful actors. One store stage per shard: a rerun resumes at that grain.
- `iter_TT/influence`: influence = sum_k lr_k * agg_ref cos(candidate_k, reference_k), agg = mean over
  references (or max); the top `keep_fraction` (or `keep_count`) are kept. Rows keep their lineage and
  add influence, rank, kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import resource
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scoder_ray.config import Config, InfluenceConf, ModelsConf, prompt_sections
from scoder_ray.prompts import SYNTH_INSTRUCTION, instruction
from scoder_ray.ray_env import actor_pool, gpu_budget, gpu_options, in_blocks, pool_sizes, side_by_side
from scoder_ray.store import RunStore, filesystem, resumed_rows, write_table
from scoder_ray.train.data import encode, prompt_response


class FeatureActor:
    """Ray Data actor: model + LoRA + moments + projector for one checkpoint; rows -> (cand_id, feature)."""

    def __init__(self, base_model: str, ckpt_dir: str, ckpt_name: str, kind: str, conf: InfluenceConf, seed: int,
                 models: ModelsConf, stage_started: float = 0.0, instruction: str = SYNTH_INSTRUCTION):
        import psutil
        import torch
        from transformers import AutoTokenizer

        from scoder_ray.influence.features import GradientFeatures
        from scoder_ray.model_cache import local_model

        # Start-up counts from this worker's birth (Python and torch imports), or from the stage's start
        # when Ray hands the actor a worker it had started before.
        started = max(psutil.Process().create_time(), stage_started)
        device = "cuda" if conf.gpus_per_actor and torch.cuda.is_available() else "cpu"  # else Ray's accounting only
        self.kind, self.conf, self.instruction = kind, conf, instruction
        base_model, ckpt_dir = local_model(base_model, models), local_model(ckpt_dir, models)  # on this node
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        self.features = GradientFeatures(base_model, ckpt_dir, ckpt_name, conf.proj_dim, seed, conf.block_rows, device,
                                         proj_dtype=conf.proj_dtype, model_dtype=conf.model_dtype,
                                         sketch_dim=conf.sketch_dim)
        self.features.projector.prepare()  # R once per actor when it is cached: start-up, not per-batch work
        self.start_s: float = time.time() - started

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        called = time.perf_counter()
        examples = []
        for i in range(len(batch["cand_id"])):
            prompt, response = prompt_response({k: batch[k][i] for k in ("snippet", "problem", "solution", "lang")
                                                if k in batch}, "synthesizer", self.instruction)
            ids, labels, _ = encode(self.tokenizer, prompt, response, self.conf.max_len)
            examples.append((ids, labels))
        feats = self.features.features_of(examples, self.kind, self.tokenizer.pad_token_id, self.conf.batch_size,
                                          self.conf.buffer_mb)
        # This actor's start-up on its first row (0 after) and this call's time on the call's first row:
        # the stage's start-up and work, apart (bench/loop.py, bench/influence.py).
        start, busy, peak = np.zeros(len(examples)), np.zeros(len(examples)), np.zeros(len(examples))
        if len(examples):
            start[0], self.start_s = self.start_s, 0.0
            busy[0] = time.perf_counter() - called
            peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: this process's peak
        return {"cand_id": batch["cand_id"], "feature": feats, "actor_start_s": start, "actor_busy_s": busy,
                "actor_peak_gib": peak}


def compute_features(rows_uri: str, out_uri: str, base_model: str, ckpt_dir: str, ckpt_name: str, kind: str,
                     conf: InfluenceConf, seed: int, models: ModelsConf, id_column: str = "cand_id",
                     accelerator_type: str = "", actors: int = 0, instruction: str = SYNTH_INSTRUCTION) -> dict[str, Any]:
    """Features of the rows at `rows_uri` (ids from `id_column`, written as cand_id) on `actors` actors
    (default influence.num_actors); rows whose features `out_uri` already holds (a resumed attempt) are not
    computed again. Returns {rows, resumed_rows, actor_start_s, actor_busy_s, actor_peak_gib}: the actors'
    start-up and time in calls, summed over actors, and the largest resident memory one reached (this run's)."""
    import ray

    ds = ray.data.read_parquet(rows_uri)
    written = resumed_rows(out_uri, f"features {ckpt_name}-{kind}", ds.count, "rows")  # counted only when resumed
    ds = ds.select_columns([id_column, "snippet", "problem", "solution"] + (["lang"] if "lang" in ds.columns() else []))
    if id_column != "cand_id":
        ds = ds.rename_columns({id_column: "cand_id"})
    if written:
        ds = ds.filter(lambda r: r["cand_id"] not in written)
    # One block per actor call, of at most sort_window rows: the calls spread over the actors, and since
    # the blocks depend only on the data, every example meets the same batch-mates however many actors.
    ds, batch = in_blocks(ds, conf.sort_window)
    rows = ds.count()
    done: dict[str, Any] = {"rows": rows + len(written), "resumed_rows": len(written), "actor_start_s": 0.0,
                            "actor_busy_s": 0.0, "actor_peak_gib": 0.0}
    if not rows:
        return done
    # Ray sets OMP_NUM_THREADS to the actor's num_cpus: that is torch's thread count in the actor.
    opts: dict[str, Any] = gpu_options(conf.gpus_per_actor, accelerator_type) or {"num_cpus": conf.cpus_per_actor}
    if not conf.gpus_per_actor and conf.memory_gib:
        opts["memory"] = int(conf.memory_gib * 2**30)
    feats = ds.map_batches(FeatureActor, fn_constructor_kwargs={"base_model": base_model, "ckpt_dir": ckpt_dir,
                                                                "ckpt_name": ckpt_name, "kind": kind, "conf": conf,
                                                                "seed": seed, "models": models,
                                                                "stage_started": time.time(), "instruction": instruction},
                           batch_size=batch, batch_format="numpy",
                           compute=actor_pool(actors or conf.num_actors, ds.num_blocks()),
                           max_restarts=3, max_task_retries=3, **opts)
    feats.write_parquet(out_uri, ray_remote_args={"num_cpus": 0})  # pools side by side may hold every CPU
    fs, path = filesystem(out_uri)
    table = pq.read_table(path, filesystem=fs, columns=["cand_id", "actor_start_s", "actor_busy_s", "actor_peak_gib"])
    table = table.filter(pc.invert(pc.is_in(table.column("cand_id"), pa.array(sorted(written), pa.string()))))
    done.update({k: round(pc.sum(table.column(k)).as_py() or 0.0, 2) for k in ("actor_start_s", "actor_busy_s")})
    done["actor_peak_gib"] = round(pc.max(table.column("actor_peak_gib")).as_py() or 0.0, 2)
    return done


def read_features(uri: str) -> tuple[list[str], np.ndarray]:
    fs, path = filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    ids = table.column("cand_id").to_pylist()
    feats = np.stack([np.asarray(f, dtype=np.float32) for f in table.column("feature").to_pylist()]) if ids else \
        np.zeros((0, 0), np.float32)
    return ids, feats


def influence_scores(cand: dict[str, np.ndarray], refs: dict[str, np.ndarray], lrs: dict[str, float],
                     aggregate: str = "mean") -> np.ndarray:
    """sum over checkpoints k of lr_k * agg_j cos(cand_k, ref_k_j). cand[k]: [N, d], refs[k]: [R, d]."""
    total = None
    for k, c in cand.items():
        r = refs[k]
        if len(r) == 0:
            raise ValueError(f"checkpoint {k}: the reference set (teacher samples) is empty")
        cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        # mean of cosines = cos against the mean of the unit references: one vector, not an N x R matrix
        sim = cn @ rn.mean(axis=0) if aggregate == "mean" else (cn @ rn.T).max(axis=1)
        total = lrs[k] * sim if total is None else total + lrs[k] * sim
    return total


def keep_top(ids: list[str], scores: np.ndarray, conf: InfluenceConf) -> tuple[np.ndarray, np.ndarray]:
    """(rank 1..N by influence, ties by cand_id; kept mask)."""
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    n_keep = conf.keep_count or max(1, int(round(conf.keep_fraction * len(ids)))) if len(ids) else 0
    return rank, rank <= n_keep


def run_warmup(cfg: Config, store: RunStore, iteration: int, base_model: str, force: bool = False) -> dict[str, Any]:
    """LoRA warm-up on a random share of the selected candidates only (LESS: a warm-up on a slice of the
    training pool; the teacher samples are the reference set the gradients are compared with, so they stay
    out of it: a model warmed up on its reference set has near-zero gradients there)."""
    from scoder_ray.train.stage import train_model

    rank_stage = f"iter_{iteration:02d}/rank"
    rank_done = store.read_done(rank_stage)
    if rank_done is None:
        raise ValueError(f"the warm-up needs {rank_stage}: run it first")

    def produce(tmp: str) -> dict[str, Any]:
        fs, path = filesystem(store.uri(rank_stage) + "/data")
        cands = pq.read_table(path, filesystem=fs).filter(pc.field("selected")).to_pylist()
        pick = sorted(cands, key=lambda r: hashlib.sha1(f"{cfg.run.seed}:warmup:{r['cand_id']}".encode()).hexdigest())
        share = int(round(cfg.influence.warmup_fraction * len(pick)))
        pick = pick[:min(len(pick), max(share, cfg.influence.warmup_min_rows))]
        rows = [{**{k: r[k] for k in ("cand_id", "snippet", "problem", "solution")}, "lang": r.get("lang") or "python"}
                for r in pick]
        write_table(f"{tmp}/mix/part-0.parquet", pa.Table.from_pylist(rows))
        summary = train_model(cfg.train.warmup, base_model, "synthesizer", f"{tmp}/mix", tmp, cfg, f"warmup-{iteration}")
        return {**summary, "candidate_rows": len(pick), "teacher_rows": 0}

    inputs = {rank_stage: rank_done["output_digest"], "base": base_model}
    return store.run_stage(f"iter_{iteration:02d}/warmup", {"train.warmup": cfg.train.warmup,
                                                             "influence.warmup_fraction": cfg.influence.warmup_fraction,
                                                             "influence.warmup_min_rows": cfg.influence.warmup_min_rows,
                                                             **prompt_sections(cfg)},
                           inputs, produce, force=force)


def run_influence(cfg: Config, store: RunStore, iteration: int, base_model: str, force: bool = False) -> dict[str, Any]:
    """Features for every warm-up checkpoint (candidates and references), then scores and the kept set."""

    it = f"iter_{iteration:02d}"
    started = time.time()  # the stage's seconds include its feature sub-stages
    rank_done = store.read_done(f"{it}/rank")
    if rank_done is None:
        raise ValueError(f"influence needs {it}/rank: run it first")
    # Candidates: the ones initial selection kept, as a Parquet shard of their own.
    cand_stage = f"{it}/features/candidates"
    cand_done = store.run_stage(cand_stage, {}, {f"{it}/rank": rank_done["output_digest"]},
                                lambda tmp: _selected(store, f"{it}/rank", tmp))
    conf = cfg.influence
    if cand_done["rows"] == 0:  # nothing survived selection: an empty kept set, no warm-up needed
        return store.run_stage(f"{it}/influence", {}, {"rank": rank_done["output_digest"]},
                               lambda tmp: _empty_influence(store, cand_stage, tmp), force=force)
    warm, teacher_done = store.read_done(f"{it}/warmup"), store.read_done("bootstrap")
    if warm is None or teacher_done is None:
        raise ValueError(f"influence needs {it}/warmup and bootstrap: run them first")
    sources = {"candidate": (store.uri(cand_stage) + "/data", "cand_id", cand_done["output_digest"]),
               "reference": (store.uri("bootstrap") + "/data", "seed_id", teacher_done["output_digest"])}
    feat_sections = {"influence.proj_dim": conf.proj_dim, "influence.max_len": conf.max_len, "run.seed": cfg.run.seed,
                     **prompt_sections(cfg)}
    lrs = {c["name"]: c["mean_lr"] for c in warm["checkpoints"]}
    memory_gib, memory_warning = actor_memory_gib(cfg)
    actor_conf = dataclasses.replace(conf, memory_gib=memory_gib)
    parts: dict[str, float] = {}  # seconds of each (checkpoint, kind) feature sub-stage, as it ran
    peaks: dict[str, float] = {}  # the largest memory one of its actors reached (GiB)
    jobs = {}
    for c in warm["checkpoints"]:
        ckpt_dir = f"{store.uri(f'{it}/warmup')}/{c['name']}"
        for kind, (uri, id_column, rows_digest) in sources.items():
            def job(actors: int, name=c["name"], d=ckpt_dir, k=kind, u=uri, col=id_column, digest=rows_digest) -> None:
                shard = store.run_stage(
                    f"{it}/features/{name}-{k}", feat_sections, {"warmup": warm["output_digest"], "rows": digest},
                    lambda tmp: compute_features(u, f"{tmp}/data", base_model, d, name, k, actor_conf, cfg.run.seed,
                                                 cfg.models, col, cfg.ray.accelerator_type, actors,
                                                 instruction(cfg.prompts.synthesizer)),
                    resume=True)
                parts[f"{name}-{k}"], peaks[f"{name}-{k}"] = shard["seconds"], shard.get("actor_peak_gib", 0.0)
            jobs[f"{c['name']}-{kind}"] = job
    side = side_by_side(jobs, feature_pools(cfg, len(jobs)), conf.gpus_per_actor, cfg.ray.accelerator_type)

    def produce(tmp: str) -> dict[str, Any]:
        cand, refs, ids = {}, {}, None
        for c in warm["checkpoints"]:
            c_ids, c_feat = read_features(store.uri(f"{it}/features/{c['name']}-candidate") + "/data")
            _, r_feat = read_features(store.uri(f"{it}/features/{c['name']}-reference") + "/data")
            order = np.argsort(c_ids)
            ids = [c_ids[i] for i in order]
            cand[c["name"]], refs[c["name"]] = c_feat[order], r_feat
        if not ids:
            raise ValueError(f"{it}: no candidates survived initial selection; nothing to filter")
        scores = influence_scores(cand, refs, lrs, conf.aggregate)
        rank, kept = keep_top(ids, scores, conf)
        fs, path = filesystem(store.uri(cand_stage) + "/data")
        rows = {r["cand_id"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}
        out = [{**rows[i], "influence": float(s), "rank": int(r), "kept": bool(k)} for i, s, r, k in zip(ids, scores, rank, kept)]
        write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(out))
        peak = max(peaks.values(), default=0.0)
        warnings = [w for w in (memory_warning, peak_warning(peak, actor_conf.memory_gib)) if w]
        return {"rows": int(kept.sum()), "candidates": len(ids), "checkpoint_lrs": lrs, "aggregate": conf.aggregate,
                "feature_seconds": parts, "feature_actor_peak_gib": peak, **side, "warnings": warnings,
                "influence_quantiles": {q: float(np.quantile(scores, q)) for q in (0.0, 0.25, 0.5, 0.75, 1.0)}}

    inputs = {"warmup": warm["output_digest"], "rank": rank_done["output_digest"]}
    sections = {"influence.keep_fraction": conf.keep_fraction, "influence.keep_count": conf.keep_count,
                "influence.aggregate": conf.aggregate, **feat_sections}
    return store.run_stage(f"{it}/influence", sections, inputs, produce, force=force, started=started)


def feature_pools(cfg: Config, pools: int) -> list[int]:
    """Actors per feature pool for the (checkpoint, kind) pools that run side by side: they share
    `ray.gpu_budget` on GPUs; CPU pools run as many at once as the cluster's CPUs hold (a pool that cannot
    get its CPUs — and its `influence.memory_gib` each — would only wait), at most `ray.parallel_checkpoints`
    checkpoints' worth (0: all)."""
    import ray

    conf = cfg.influence
    at_most = 2 * cfg.ray.parallel_checkpoints
    if not conf.gpus_per_actor:
        have = ray.cluster_resources()
        fit = int(have.get("CPU", 1) // (conf.num_actors * conf.cpus_per_actor))
        memory_gib = actor_memory_gib(cfg)[0]
        if memory_gib:
            fit = min(fit, int(have.get("memory", 0) // (conf.num_actors * memory_gib * 2**30)))
        at_most = min(at_most or max(1, fit), max(1, fit))
    return pool_sizes(pools, conf.gpus_per_actor, conf.num_actors, gpu_budget(cfg), at_most)


def actor_memory_gib(cfg: Config) -> tuple[float, str]:
    """(GiB each CPU feature actor reserves, a warning or ''): influence.memory_gib, lowered to the largest
    live node's memory for Ray when no autoscaler (ray.cluster_config) may add a bigger node — an actor
    asking more than any node has would wait forever; lowered, it runs alone on that node."""
    import ray

    want = cfg.influence.memory_gib
    if cfg.influence.gpus_per_actor or not want or cfg.ray.cluster_config:
        return (0.0 if cfg.influence.gpus_per_actor else want), ""
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0) / 2**30
    if want <= largest:
        return want, ""
    return largest, (f"influence.memory_gib={want:g} is more than any node has for Ray (the largest: {largest:.1f} "
                     f"GiB, what was free when Ray started): each feature actor reserves {largest:.1f} GiB, one at a "
                     f"time per node, and may run short of memory")


def peak_warning(peak_gib: float, reserved_gib: float) -> str:
    """A warning when CPU feature actors used more memory than influence.memory_gib reserved for each ('' when
    not, or nothing was reserved): Ray packs actors onto a node by the reservation, so a node may then hold
    more of them than its memory does. Ray Data's own detector is off (ray_env.quiet_known_warnings): it
    warned, in terms of Ray's API, whenever the peak came within 25% of the reservation."""
    if not reserved_gib or peak_gib <= reserved_gib:
        return ""
    return (f"feature actors reached {peak_gib:.1f} GiB of memory each, more than the {reserved_gib:g} GiB "
            f"influence.memory_gib reserves for them: a node may hold more of them than its memory does; set "
            f"influence.memory_gib={math.ceil(peak_gib * 1.1 * 10) / 10:g}")


def _empty_influence(store: RunStore, cand_stage: str, tmp: str) -> dict[str, Any]:
    fs, path = filesystem(store.uri(cand_stage) + "/data")
    table = pq.read_table(path, filesystem=fs)
    for name, typ in (("influence", pa.float64()), ("rank", pa.int64()), ("kept", pa.bool_())):
        table = table.append_column(name, pa.array([], type=typ))
    write_table(f"{tmp}/data/part-0.parquet", table)
    return {"rows": 0, "candidates": 0, "note": "no candidate survived initial selection"}


def _selected(store: RunStore, rank_stage: str, tmp: str) -> dict[str, Any]:
    fs, path = filesystem(store.uri(rank_stage) + "/data")
    table = pq.read_table(path, filesystem=fs)
    table = table.filter(pc.field("selected"))
    write_table(f"{tmp}/data/part-0.parquet", table)
    return {"rows": table.num_rows}
