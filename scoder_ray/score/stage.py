"""Scoring stages.

- `iter_TT/score`: every parsed candidate gets `aspect_<name>` (0-9, the scorer LLM on vLLM actors),
  `exec_verdict` / `exec_reason` (the sandbox). The expensive part, independent of the weights.
- `iter_TT/rank`: score = w . x with the fitted weights (the run's `weights` stage) or the configured
  ones, then per-seed selection (select.py): adds `score`, `selected`, `drop_reason`.
- `weights`: `scoder-ray fit-weights` fits w on labelled candidates (a label file, or the teacher's
  overall 0-9 judgements) and reports the held-out rank correlation.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scoder_ray import jsonl, progress
from scoder_ray.config import LABELS_FILE, Config, engine_sections
from scoder_ray.generate import kept_engines
from scoder_ray.generate.sample import engine_actor_options, engine_pools
from scoder_ray.lineage import derived_seed, input_digest
from scoder_ray.ray_env import gpu_budget, in_blocks
from scoder_ray.score.aspects import Scorer
from scoder_ray.score.execution import execute_table
from scoder_ray.score.select import feature_names, features, select_group
from scoder_ray.score.weights import cross_validated_spearman, fit_weights, weight_vector
from scoder_ray.store import RunStore, check_input_file, filesystem, resumed_rows, write_table, write_text

WEIGHTS_STAGE = "weights"


def run_score(cfg: Config, store: RunStore, iteration: int = 1, force: bool = False) -> dict[str, Any]:
    import ray

    upstream = f"iter_{iteration:02d}/sample"
    done = store.read_done(upstream)
    if done is None:
        raise ValueError(f"scoring needs candidates: run {upstream} first")
    if not done["rows"] or not done.get("parse_rate", 1.0):
        # Nothing to score: said in words, with the sample stage's reasons; the loop then ends, goes on or
        # fails as loop.on_empty_iteration says (an `empty` score stage is what it reads).
        reasons = sorted(done.get("rejected", {}).items(), key=lambda kv: -kv[1])[:3]
        why = (f"{upstream}: none of the {done['rows']} candidates parsed into a (problem, solution) pair"
               + (f" (most common reasons: {', '.join(f'{r} x{n}' for r, n in reasons)}"
                  f"; {done.get('truncated', 0)} hit sample.max_tokens)" if reasons else "")
               + ". The synthesizer does not follow the sample prompt: check models.synthesizer, "
               "sample.max_tokens and the bootstrap's training data")
        if cfg.loop.on_empty_iteration == "fail":
            raise ValueError(why + " (loop.on_empty_iteration=fail)")
        return store.run_stage(f"iter_{iteration:02d}/score", {"loop.on_empty_iteration": cfg.loop.on_empty_iteration},
                               {upstream: done["output_digest"]}, lambda tmp: {"rows": 0, "empty": why, "warnings": [why]},
                               force=force)
    def produce(tmp: str) -> dict[str, Any]:
        stage = f"iter_{iteration:02d}/score"
        parsed = done["rows"] - sum(done.get("rejected", {}).values())
        written = resumed_rows(f"{tmp}/data", stage, parsed, "candidates")
        cands, _ = in_blocks(ray.data.read_parquet(store.uri(upstream) + "/data").filter(
            lambda r: r["parse_ok"] and r["cand_id"] not in written), cfg.sample.batch_size)
        left = cands.count()
        bar = progress.start(cfg.run.id, stage, left, "candidates")
        engines = scorer_engines(cfg, iteration, cands.num_blocks()) if left else {
            "engines": 0, "reused": False, "kept": False, "why_not_kept": "the resumed attempt held every score"}
        execute = ray.remote(execute_table).options(num_cpus=1)
        tag = time.strftime("%Y%m%dT%H%M%S", time.gmtime())  # a resumed attempt's blocks beside the first run's

        def sandbox(i: int, scored) -> Any:  # runs as soon as its block is scored, on a free CPU
            return execute.remote(scored, f"{tmp}/data/part-{tag}-{i:05d}.parquet", cfg.score.exec_timeout_s,
                                  cfg.score.exec_workers, cfg.evaluate.isolation)

        executed = []
        if left:
            try:
                executed = kept_engines.deal(engines["actors"], cands.to_arrow_refs(), "score_block",
                                             cfg.engine.blocks_in_flight, bar, then=sandbox)
            except BaseException:
                kept_engines.release(engines["actors"])
                raise
            engines["kept"] = engines.pop("keep")()  # kept for the next iteration's scoring, or ended now
        ray.get(executed)
        progress.stop(bar)
        names = [a.name for a in cfg.score.aspects]
        stats = ray.data.read_parquet(f"{tmp}/data").select_columns(
            [f"aspect_{n}" for n in names] + ["aspects_fallback", "exec_verdict", "exec_decided", "ckpt", "engine_start_s"]).to_pandas()
        signal = judge_signal(stats, names, cfg.score.min_aspect_std)
        if signal["degenerate"] and cfg.score.require_signal:
            raise ValueError(f"iter_{iteration:02d}/score: the scorer {cfg.models.scorer} is a degenerate judge "
                             f"({'; '.join(signal['problems'])}); its scores cannot rank candidates. Use a stronger "
                             "models.scorer, or set score.require_signal=false to go on with a warning")
        return {"rows": len(stats), "resumed_rows": len(written), "judge_signal": signal,
                "warnings": [f"degenerate judge: {p}" for p in signal["problems"]] if signal["degenerate"] else [], "candidates_in": done["rows"], "scorer": cfg.models.scorer,
                "aspect_histograms": {n: _histogram(stats[f"aspect_{n}"]) for n in names},
                "aspect_means_by_ckpt": {c: {n: round(float(g[f"aspect_{n}"][g[f"aspect_{n}"] >= 0].mean()), 3)
                                             for n in names} for c, g in stats.groupby("ckpt")},
                "parse_fallbacks": int(stats["aspects_fallback"].sum()),
                "unparsed": int((stats[[f"aspect_{n}" for n in names]] < 0).any(axis=1).sum()),
                "exec_verdicts": dict(Counter(stats["exec_verdict"])),
                "exec_decided": dict(Counter(stats["exec_decided"])),  # outside: judged from reported values
                "engine_start_s": round(float(stats["engine_start_s"].sum()), 2), "scorer_engines": engines}

    sections = {"score.aspects": cfg.score.aspects, "score.max_tokens": cfg.score.max_tokens,
                "score.exec_timeout_s": cfg.score.exec_timeout_s, "models.scorer": cfg.models.scorer,
                **engine_sections(cfg), "run.seed": cfg.run.seed}
    return store.run_stage(f"iter_{iteration:02d}/score", sections, {upstream: done["output_digest"]}, produce,
                           force=force, resume=True)


def scorer_engines(cfg: Config, iteration: int, blocks: int) -> dict[str, Any]:
    """The scorer's engine actors: those the last iteration's scoring kept (same model and settings), else a
    pool started now (the stage's share of the GPU budget, no more engines than blocks). Returns {"actors",
    "engines", "reused", "keep": a function that keeps them for the next scoring or ends them, and returns
    whether it kept them; "why_not_kept" is added then}."""
    import ray

    key = repr((cfg.models.scorer, cfg.engine, cfg.score.aspects, cfg.score.max_tokens, cfg.run.seed, cfg.models))
    actors = kept_engines.take(key)
    reused = actors is not None
    if actors is None:
        opts = engine_actor_options(cfg.engine, cfg.ray.accelerator_type)
        opts.pop("compute")
        # The model folder is resolved on each engine's node (model_cache.local_model).
        actors = [ray.remote(Scorer).options(**opts).remote(cfg.models.scorer, cfg.engine, cfg.score, cfg.run.seed,
                                                           cfg.models)
                  for _ in range(max(1, min(engine_pools(cfg)[0], blocks)))]
    info: dict[str, Any] = {"actors": actors, "engines": len(actors), "reused": reused}

    def keep() -> bool:
        del info["actors"]
        gpus = len(actors) * cfg.engine.gpus_per_engine
        why = kept_engines.scorer_keep_reason(cfg, iteration, len(actors),
                                              gpu_budget(cfg) or ray.cluster_resources().get("GPU", 0))
        info["why_not_kept"] = why
        if why:
            kept_engines.release(actors)
        else:
            kept_engines.keep(key, actors, gpus)
        return not why

    info["keep"] = keep
    return info


def judge_signal(stats: pd.DataFrame, names: list[str], min_std: float) -> dict[str, Any]:
    """Whether the scorer's aspect scores carry information: each aspect's spread (std over candidates), the
    rank correlation between aspects, and the share of candidates given one value on every aspect. The judge is
    degenerate when every aspect is near-constant (std < min_std) or 90% of candidates got all-equal aspects."""
    cols = [f"aspect_{n}" for n in names]
    valid = stats[cols][(stats[cols] >= 0).all(axis=1)]
    std = {n: round(float(valid[f"aspect_{n}"].std(ddof=0)), 3) if len(valid) else 0.0 for n in names}
    corr = valid.rank().corr() if len(valid) > 1 else None
    pairs = {f"{a}~{b}": (None if corr is None or pd.isna(corr.at[f"aspect_{a}", f"aspect_{b}"])
                         else round(float(corr.at[f"aspect_{a}", f"aspect_{b}"]), 3))
             for i, a in enumerate(names) for b in names[i + 1:]}
    equal = float((valid.nunique(axis=1) == 1).mean()) if len(valid) and len(names) > 1 else 0.0
    flat = [n for n in names if std[n] < min_std]
    problems = []
    if len(valid) < 2:
        problems.append(f"{len(valid)} candidate(s) with readable scores")
    elif len(flat) == len(names):
        problems.append(f"every aspect is near-constant (std < {min_std}: {std})")
    if len(valid) >= 2 and equal >= 0.9:
        problems.append(f"{equal:.0%} of candidates got the same score on every aspect")
    return {"aspect_std": std, "aspect_rank_correlation": pairs, "all_aspects_equal_share": round(equal, 4),
            "flat_aspects": flat, "degenerate": bool(problems), "problems": problems}


def current_weights(cfg: Config, store: RunStore) -> tuple[np.ndarray, str]:
    """(w over aspects + execution, where it came from): fitted if the run has them, else configured."""
    names = feature_names(cfg.score)
    fitted = store.read_done(WEIGHTS_STAGE)
    if fitted and fitted.get("names") == names:
        return np.array([fitted["weights"][n] for n in names]), "fitted"
    return weight_vector(names, cfg.score.weights), "configured" if cfg.score.weights else "equal (not fitted)"


def run_rank(cfg: Config, store: RunStore, iteration: int = 1, force: bool = False) -> dict[str, Any]:
    """Score, per-seed selection and cross-seed near-duplicate removal, on the driver: the scored table is
    small next to what produced it (paper-7b: ~110K rows, ~250 MB), and a Ray Data groupby cost ~20 s of
    shuffle overhead per iteration on the tiny loop for 125 rows."""
    upstream = f"iter_{iteration:02d}/score"
    done = store.read_done(upstream)
    if done is None:
        raise ValueError(f"ranking needs scored candidates: run {upstream} first")
    w, source = current_weights(cfg, store)

    def produce(tmp: str) -> dict[str, Any]:
        fs, path = filesystem(store.uri(upstream) + "/data")
        scored = pq.read_table(path, filesystem=fs).to_pandas()
        groups = [select_group(g, cfg.score, w) for _, g in scored.sort_values("cand_id").groupby("seed_id", sort=True)]
        ranked = pd.concat(groups, ignore_index=True) if groups else scored.assign(score=[], selected=[], drop_reason=[])
        drops = cross_seed_near_duplicates(cfg, store, iteration, ranked)
        if drops:
            ranked = _apply_drops(ranked, drops)
        write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pandas(ranked, preserve_index=False))
        stats = ranked
        return {"rows": int(stats["selected"].sum()), "candidates": len(stats),
                "weights": dict(zip(feature_names(cfg.score), map(float, w))), "weights_source": source,
                "dropped": {k: int(v) for k, v in stats["drop_reason"][stats["drop_reason"] != ""].value_counts().items()},
                "score_histogram_by_ckpt": {c: _histogram(g["score"].dropna().round().astype(int)) for c, g in stats.groupby("ckpt")},
                "selected_by_ckpt": {c: int(g["selected"].sum()) for c, g in stats.groupby("ckpt")}}

    sections = {"score.top_k": cfg.score.top_k, "score.threshold": cfg.score.threshold,
                "score.exec_filter": cfg.score.exec_filter, "score.near_dup_threshold": cfg.score.near_dup_threshold,
                "quality.near_dup_threshold": cfg.quality.near_dup_threshold,
                "quality.reference_near_dup_threshold": cfg.quality.reference_near_dup_threshold}
    inputs = {upstream: done["output_digest"], "weights": json.dumps([round(float(v), 6) for v in w]),
              "reference": _reference_stage(store, iteration)}
    return store.run_stage(f"iter_{iteration:02d}/rank", sections, inputs, produce, force=force)


def _reference_stage(store: RunStore, iteration: int) -> str:
    """What this iteration's kept samples must not repeat: the teacher samples (bootstrap), and from
    iteration 2 on, `iter_{T-1}/train_data` (the teacher samples plus every sample kept so far)."""
    stage = f"iter_{iteration - 1:02d}/train_data" if iteration > 1 else "bootstrap"
    done = store.read_done(stage)
    return f"{stage}:{done['output_digest']}" if done else ""


def cross_seed_near_duplicates(cfg: Config, store: RunStore, iteration: int, ranked: pd.DataFrame) -> dict[str, str]:
    """cand_id -> drop reason for selected candidates that are near duplicates of a better one of another
    seed (`near_duplicate_across_seeds`) or of a teacher sample or an earlier iteration's kept sample
    (`near_duplicate_of_earlier`). Best score first, so the better of two stays."""
    from scoder_ray.quality import near_duplicates

    sel = ranked[ranked["selected"]][["cand_id", "problem", "solution", "score"]]
    if sel.empty:
        return {}
    sel = sel.sort_values(["score", "cand_id"], ascending=[False, True])
    reference: list[str] = []
    ref = _reference_stage(store, iteration)
    if ref:
        fs, path = filesystem(store.uri(ref.split(":", 1)[0]) + "/data")
        table = pq.read_table(path, filesystem=fs, columns=["problem", "solution"])
        reference = [p + "\n" + s for p, s in zip(table.column("problem").to_pylist(), table.column("solution").to_pylist())]
    near = near_duplicates([p + "\n" + s for p, s in zip(sel["problem"], sel["solution"])], cfg.quality.near_dup_threshold,
                           reference, cfg.quality.reference_near_dup_threshold)
    names = {"near_duplicate": "near_duplicate_across_seeds", "near_duplicate_of_reference": "near_duplicate_of_earlier"}
    return {c: names[r] for c, r in zip(sel["cand_id"], near) if r}


def _apply_drops(batch: pd.DataFrame, drops: dict[str, str]) -> pd.DataFrame:
    batch = batch.copy()
    hit = batch["cand_id"].map(drops).fillna("")
    batch["drop_reason"] = batch["drop_reason"].where(hit == "", hit)
    batch["selected"] = batch["selected"] & (hit == "")
    return batch


def run_fit_weights(cfg: Config, store: RunStore, labels_file: Optional[str] = None, iteration: int = 1,
                    num_labels: int = 200, force: bool = False) -> dict[str, Any]:
    """Fit w on labelled candidates of `iter_TT/score`: from `labels_file` (JSONL/Parquet: cand_id, label
    0-9) or, without one, the teacher's overall judgement of `num_labels` candidates."""
    upstream = f"iter_{iteration:02d}/score"
    done = store.read_done(upstream)
    if done is None:
        raise ValueError(f"fit-weights needs scored candidates: run {upstream} first")
    fs, path = filesystem(store.uri(upstream) + "/data")
    scored = pq.read_table(path, filesystem=fs).to_pandas()
    names = feature_names(cfg.score)

    def produce(tmp: str) -> dict[str, Any]:
        labels = _read_labels(labels_file) if labels_file else _teacher_labels(cfg, scored, num_labels)
        joined = scored.merge(labels, on="cand_id", how="inner")
        unknown = sorted(set(labels["cand_id"]) - set(scored["cand_id"]))
        if unknown and joined.empty:  # labels made for another run (or its unparsed candidates only)
            raise ValueError(f"labels name {len(unknown)} cand_id(s), none among the scored candidates of {upstream}, "
                             f"e.g. {unknown[0]!r}")
        joined = joined[(joined[[f"aspect_{a.name}" for a in cfg.score.aspects]] >= 0).all(axis=1)]
        x, y = features(joined, cfg.score), joined["label"].to_numpy(dtype=float)
        w = fit_weights(x, y, cfg.score.ridge)
        rho = cross_validated_spearman(x, y, cfg.score.ridge, seed=cfg.run.seed)
        write_text(f"{tmp}/weights.json", json.dumps({"names": names, "weights": dict(zip(names, map(float, w)))}, indent=2))
        return {"rows": len(joined), "names": names, "weights": dict(zip(names, map(float, w))),
                "heldout_spearman": round(rho, 4), "labels": labels_file or f"teacher:{cfg.teacher.model}",
                "labels_unmatched": len(unknown),
                "objective": "non-negative ridge least squares on centred data (scipy nnls), normalised to sum 1"}


    if labels_file:
        check_input_file("score.labels_file", labels_file, LABELS_FILE)
    inputs = {upstream: done["output_digest"],
              "labels": f"{labels_file}:{input_digest(labels_file)}" if labels_file else f"teacher:{num_labels}"}
    return store.run_stage(WEIGHTS_STAGE, {"score.aspects": cfg.score.aspects, "score.ridge": cfg.score.ridge},
                           inputs, produce, force=force)


def _read_labels(path: str) -> pd.DataFrame:
    """(cand_id, label) rows of a JSONL or Parquet label file; every bad row is named by its line (row):
    not an object, no cand_id, a label missing or outside 0-9, one cand_id labelled twice differently."""
    if path.endswith(".parquet"):
        fs, where = filesystem(path)
        df = pq.read_table(where, filesystem=fs).to_pandas()
        missing = [c for c in ("cand_id", "label") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (need cand_id and label 0-9)")
        records = enumerate(df[["cand_id", "label"]].to_dict("records"), 1)
        unit = "row"
    else:
        records, unit = jsonl.records(path), "line"
    seen: dict[str, tuple[int, float]] = {}
    for n, r in records:
        where = f"{path}:{n}" if unit == "line" else f"{path} row {n}"
        cand, label = r.get("cand_id"), r.get("label")
        if not isinstance(cand, str) or not cand:
            raise ValueError(f"{where}: no cand_id (a string)")
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 9:  # NaN fails too
            raise ValueError(f"{where}: label {label!r} of {cand!r} is not a number in 0-9")
        if cand in seen and seen[cand][1] != label:
            raise ValueError(f"{where}: {cand!r} is labelled {label!r} here and {seen[cand][1]!r} on {unit} {seen[cand][0]}")
        seen.setdefault(cand, (n, float(label)))
    if not seen:
        raise ValueError(f"{path}: no labels")
    return pd.DataFrame({"cand_id": list(seen), "label": [v for _, v in seen.values()]})


JUDGE_INSTRUCTION = """Rate the overall quality of this programming exercise (problem and solution) for training a
code model, from 0 (useless) to 9 (excellent). Answer with the digit only.

Problem:
{problem}

Solution:
```python
{solution}
```"""


def _teacher_labels(cfg: Config, scored: pd.DataFrame, n: int) -> pd.DataFrame:
    from scoder_ray import prompts
    from scoder_ray.generate.teacher import Teacher, completion_text, request_body

    pick = scored.sort_values("cand_id").sample(n=min(n, len(scored)), random_state=cfg.run.seed)
    bodies = [request_body(cfg.teacher, prompts.chat(JUDGE_INSTRUCTION.format(problem=p, solution=s)),
                           seed=derived_seed(cfg.run.seed, "judge", c))
              for p, s, c in zip(pick["problem"], pick["solution"], pick["cand_id"])]
    labels = []
    for response in Teacher(cfg.teacher).run(bodies):
        m = re.search(r"[0-9]", completion_text(response)[0])
        labels.append(int(m.group()) if m else -1)
    out = pd.DataFrame({"cand_id": pick["cand_id"].to_numpy(), "label": labels})
    return out[out["label"] >= 0]


def _histogram(values: pd.Series) -> dict[str, int]:
    counts = Counter(int(v) for v in values if v >= 0)
    return {str(k): counts.get(k, 0) for k in range(10)}
