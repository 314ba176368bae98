"""Final synthesis: the last synthesizer writes the dataset the SCoder model is trained on.

`final/data/part-0.parquet`: cand_id, seed_id, snippet, problem, solution, tokens — the parseable samples,
exact duplicates removed, in cand_id order, cut to `loop.final_dataset_size`. Samples per seed are
`loop.final_samples_per_seed`, or enough to reach the size at the parse rate the last iteration measured
(x1.25 for headroom), on as many distinct seeds (chosen by hash of the run seed) as that needs. `dataset_digest` (printed at the end of every run) is
the SHA-256 of the sorted (problem, solution) rows: equal digests, equal datasets.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scoder_ray import progress, prompts
from scoder_ray.config import Config, engine_sections, prompt_sections
from scoder_ray.generate.sample import sample_checkpoint
from scoder_ray.lineage import pick_seeds, synthesizer_checkpoints, synthesizer_digest
from scoder_ray.seeds import seeds_uri
from scoder_ray.store import RunStore, filesystem, resumed_rows, write_table

STAGE = "final"
COLUMNS = ["cand_id", "seed_id", "snippet", "problem", "solution", "tokens"]


def dataset_digest(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for problem, solution in sorted((r["problem"], r["solution"]) for r in rows):
        h.update(json.dumps([problem, solution]).encode() + b"\n")
    return h.hexdigest()


def teacher_samples(store: RunStore) -> list[dict[str, str]]:
    """The bootstrap stage's (problem, solution) rows: what the final dataset is deduplicated and measured against."""
    fs, path = filesystem(store.uri("bootstrap") + "/data")
    return pq.read_table(path, filesystem=fs, columns=["problem", "solution"]).to_pylist()


def final_filter(cfg: Config, raw, teacher: list[dict[str, str]]) -> tuple[Any, dict[str, Any]]:
    """The parsed samples that become the dataset, in cand_id order: exact duplicates, samples whose solution is
    another's code (comments, docstrings and case aside), solutions that fail the examples their problem states
    (sandbox), a second answer to the same problem, near duplicates of a teacher sample or of another sample are
    dropped; `raw["reason"]` gets why.
    Returns (kept rows, counts for _DONE.json)."""
    from scoder_ray.quality import code_key, near_duplicates, problem_key
    from scoder_ray.score.execution import sandbox_verdicts

    parsed = raw[raw["parse_ok"]].sort_values("cand_id")
    dup = parsed.duplicated(["problem", "solution"])
    raw.loc[parsed.index[dup], "reason"] = "duplicate"
    # The same code under other words (or comments, docstrings): one copy teaches it, the first in cand_id order.
    same_code = ~dup & parsed["solution"].map(code_key).duplicated()
    raw.loc[parsed.index[same_code], "reason"] = "duplicate_solution"
    unique = parsed[~dup & ~same_code]
    verdicts = sandbox_verdicts(list(unique["cand_id"]), list(unique["problem"]), list(unique["solution"]),
                                cfg.score.exec_timeout_s, cfg.score.exec_workers, cfg.evaluate.isolation)
    failed = [verdicts.get(c, ("",))[0] != "passed" for c in unique["cand_id"]]
    raw.loc[unique.index[failed], "reason"] = "exec_failed"
    ran = unique[[not f for f in failed]]
    # One answer per problem (case and spacing aside): a second solution to the same words teaches no new task,
    # and of two different answers one is often wrong. After execution, so the kept one ran.
    same_problem = ran["problem"].map(problem_key).duplicated()
    raw.loc[ran.index[same_problem], "reason"] = "duplicate_problem"
    ran = ran[~same_problem]
    near = near_duplicates([p + "\n" + s for p, s in zip(ran["problem"], ran["solution"])], cfg.quality.near_dup_threshold,
                           [t["problem"] + "\n" + t["solution"] for t in teacher], cfg.quality.reference_near_dup_threshold)
    for idx, reason in zip(ran.index, near):
        if reason:
            raw.loc[idx, "reason"] = reason.replace("of_reference", "of_teacher")
    kept = ran[[not r for r in near]]
    return kept, {"duplicates": int(dup.sum()), "duplicate_solutions": int(same_code.sum()), "exec_failed": int(sum(failed)),
                  "duplicate_problems": int(same_problem.sum()),
                  "near_duplicates": sum(1 for r in near if r == "near_duplicate"),
                  "near_duplicates_of_teacher": sum(1 for r in near if r == "near_duplicate_of_reference")}


def final_plan(cfg: Config, store: RunStore, n_seeds: int) -> tuple[int, int]:
    """(seeds to use, samples per seed): enough for final_dataset_size at the last measured parse rate
    (x1.25 headroom), spread over as many distinct seeds as the pool has before repeating any."""
    # The latest iteration that parsed anything (an empty one, or those after a stop, say nothing of it).
    rates = (d.get("parse_rate", 0) for t in range(cfg.loop.iterations, 0, -1)
             if (d := store.read_done(f"iter_{t:02d}/sample")) is not None)  # read from the last back, lazily
    last = next((r for r in rates if r > 0), None)
    parse_rate = max(0.05, last) if last else 0.5
    needed = math.ceil(1.25 * cfg.loop.final_dataset_size / parse_rate)
    if cfg.loop.final_samples_per_seed:
        per_seed = cfg.loop.final_samples_per_seed
        return min(n_seeds, math.ceil(needed / per_seed)), per_seed
    per_seed = max(1, math.ceil(needed / max(1, n_seeds)))
    return min(n_seeds, math.ceil(needed / per_seed)), per_seed


def run_final(cfg: Config, store: RunStore, force: bool = False) -> dict[str, Any]:
    import ray

    seeds_done = store.read_done("seeds")
    if seeds_done is None:
        raise ValueError("final synthesis needs the seed pool: run the seeds stage first")
    iteration = cfg.loop.iterations + 1  # the synthesizer after the last iteration
    name, path = synthesizer_checkpoints(store, iteration)[-1]
    n_seeds, n = final_plan(cfg, store, seeds_done["rows"])

    def produce(tmp: str) -> dict[str, Any]:
        from scoder_ray.quality import audit, decontam_report, diversity, echo_phrases, narrowing_warning

        chosen = {s["seed_id"] for s in pick_seeds(store, n_seeds, cfg.run.seed + 999_999)}
        seeds = ray.data.read_parquet(seeds_uri(store)).select_columns(["seed_id", "snippet", "lang"]).filter(
            lambda r: r["seed_id"] in chosen)
        written = resumed_rows(f"{tmp}/raw/data", STAGE, len(chosen) * n, "samples")
        bar = progress.start(cfg.run.id, "final", len(chosen) * n - len(written), "samples")
        sample_checkpoint(cfg, seeds, iteration, "final", path, f"{tmp}/raw", n=n, progress=bar, written=written)
        progress.stop(bar)
        raw = ray.data.read_parquet(f"{tmp}/raw/data").select_columns(COLUMNS + ["parse_ok", "reason", "engine_start_s"]).to_pandas()
        raw["reason"] = raw["reason"].astype(object)
        teacher = teacher_samples(store)
        kept, checks = final_filter(cfg, raw, teacher)
        # Round robin over seeds (every seed's first accepted sample, then the seconds...): a dataset cut at
        # final_dataset_size keeps as many distinct seeds as it can.
        order = kept.assign(_nth=kept.groupby("seed_id").cumcount()).sort_values(["_nth", "cand_id"], kind="stable")
        rows = order[COLUMNS].head(cfg.loop.final_dataset_size).to_dict("records")
        if not rows:
            reasons = raw["reason"][raw["reason"] != ""].value_counts().to_dict()
            raise ValueError(f"final synthesis: none of the {len(raw)} samples of {path} passed the parser and the "
                             f"quality gates ({reasons}); the synthesizer does not write usable samples yet (train it "
                             "longer, check the teacher samples, or see quality.* in the config)")
        write_table(f"{tmp}/rejected/part-0.parquet", pa.Table.from_pandas(
            raw[raw["reason"] != ""][COLUMNS + ["reason"]], preserve_index=False))
        schema = pa.schema([(c, pa.int64() if c == "tokens" else pa.string()) for c in COLUMNS])
        write_table(f"{tmp}/data/part-0.parquet", pa.Table.from_pylist(rows, schema=schema))
        rejected = {k: int(v) for k, v in raw["reason"][raw["reason"] != ""].value_counts().items()}
        yielded = int(kept["seed_id"].nunique())
        warnings = [f"{len(rows)} of the {cfg.loop.final_dataset_size} samples asked for passed the parser and the "
                    f"quality gates (generated {len(raw)})"] if len(rows) < cfg.loop.final_dataset_size else []
        if yielded < n_seeds / 2:
            top = ", ".join(f"{k} {v}" for k, v in list(rejected.items())[:3])
            warnings.append(f"only {yielded} of the {n_seeds} seeds ({yielded / n_seeds:.0%}) yielded an accepted "
                            f"sample: the synthesizer mostly writes what the gates reject ({top}); the dataset "
                            "holds only what passed")
        div = diversity([r["problem"] for r in rows], [t["problem"] for t in teacher], seed=cfg.run.seed)
        warnings += narrowing_warning(div, "the final dataset", cfg.quality.min_diversity_ratio)
        return {"rows": len(rows), "target": cfg.loop.final_dataset_size, "generated": len(raw),
                "seeds_yielding": yielded,
                "seeds": n_seeds, "samples_per_seed": n, "resumed_rows": len(written), "parse_rate": round(float(raw["parse_ok"].mean()), 4),
                **checks,
                "rejected": rejected,
                "decontam": decontam_report(cfg.quality, dict(cfg.evaluate.problems)), "tokens": int(raw["tokens"].sum()),
                "synthesizer": path, "engine_start_s": round(float(raw["engine_start_s"].sum()), 2),
                "dataset_digest": dataset_digest(rows), "diversity": div,
                "audit": audit(rows, cfg.quality, echo_phrases(prompts.instruction(cfg.prompts.synthesizer))),
                "warnings": warnings}

    sections = {"loop.final_dataset_size": cfg.loop.final_dataset_size, "sample": cfg.sample, "quality": cfg.quality,
                **engine_sections(cfg), "run.seed": cfg.run.seed, **prompt_sections(cfg)}
    inputs = {"seeds": seeds_done["output_digest"], "synthesizer": f"{name}={path}:{synthesizer_digest(store, iteration)}", "plan": f"{n_seeds}x{n}"}
    return store.run_stage(STAGE, sections, inputs, produce, force=force, resume=True)
