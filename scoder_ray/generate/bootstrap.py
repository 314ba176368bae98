"""Bootstrap stage: the teacher writes superior (problem, solution) samples for a few hundred seeds.

Output `bootstrap/data/part-0.parquet`: seed_id, snippet, problem, solution, raw, teacher, finish_reason,
prompt_tokens, completion_tokens, exec_reason. Completions that do not parse, fail a quality gate or fail in the
sandbox (the solution with the examples its problem states) go to `bootstrap/rejected/` with their reason.
`_DONE.json` holds the usage (requests sent, cache hits, tokens, retries) and the estimated cost.
With `teacher.samples_file`, the user's own samples are validated and used instead of any request.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scoder_ray import prompts
from scoder_ray.config import Config, prompt_sections
from scoder_ray.generate.prices import teacher_prices
from scoder_ray.generate.teacher import Teacher, completion_text, request_body
from scoder_ray.lineage import derived_seed, input_digest, pick_seeds
from scoder_ray.store import RunStore, filesystem, write_table

STAGE = "bootstrap"
COLUMNS = ["seed_id", "snippet", "lang", "problem", "solution", "raw", "teacher", "finish_reason", "prompt_tokens",
           "completion_tokens", "parse_ok", "reason", "exec_reason"]


def run_bootstrap(cfg: Config, store: RunStore, force: bool = False) -> dict[str, Any]:
    conf = cfg.teacher
    if conf.samples_file:
        from scoder_ray.seeds import resolve_rows_file

        path = resolve_rows_file(conf.samples_file)
        inputs = {"samples_file": input_digest(path)}
        produce = lambda tmp: _from_file(path, tmp, cfg)  # noqa: E731
    else:
        seeds = store.read_done("seeds")
        if seeds is None:
            raise ValueError("bootstrap needs the seed pool: run the seeds stage first (or set teacher.samples_file)")
        inputs = {"seeds": seeds["output_digest"]}
        produce = lambda tmp: _from_teacher(cfg, store, tmp)  # noqa: E731
    sections = {"teacher": conf, "quality": cfg.quality, "run.seed": cfg.run.seed, **prompt_sections(cfg)}
    return store.run_stage(STAGE, sections, inputs, produce, force=force)


def _from_teacher(cfg: Config, store: RunStore, out_uri: str) -> dict[str, Any]:
    from scoder_ray.quality import echo_phrases

    conf = cfg.teacher
    seeds = pick_seeds(store, conf.num_seeds, cfg.run.seed)
    template = prompts.instruction(cfg.prompts.synthesizer)
    echoes = echo_phrases(template)
    bodies = [request_body(conf, prompts.chat(prompts.synthesizer_prompt(s["snippet"], s["lang"], template)),
                           seed=derived_seed(cfg.run.seed, "teacher", s["seed_id"]), layout=conf.constrain_layout)
              for s in seeds]
    teacher = Teacher(conf)
    responses = teacher.run(bodies, labels=[f"seed {s['seed_id']}" for s in seeds])
    index = _contamination_index(cfg)
    rows = []
    for seed, response in zip(seeds, responses):
        text, finish = completion_text(response)
        problem, solution, reason = prompts.parse_sample(text, seed["snippet"], cfg.quality, index, echoes)
        if finish == "length" and reason:
            reason = f"max_tokens:{reason}"  # cut at teacher.max_tokens, and it shows
        elif finish == prompts.PROMPT_TOO_LONG:  # refused by the teacher as longer than its context: nothing was paid
            reason = prompts.PROMPT_TOO_LONG
        usage = response.get("usage") or {}
        rows.append({"seed_id": seed["seed_id"], "snippet": seed["snippet"], "lang": seed["lang"], "problem": problem,
                     "solution": solution,
                     "raw": text, "teacher": conf.model, "finish_reason": finish,
                     "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                     "completion_tokens": int(usage.get("completion_tokens") or 0),
                     "parse_ok": not reason, "reason": reason})
    summary = _write(rows, out_uri, _execute(rows, cfg))
    u = teacher.usage
    summary["usage"] = {"requests_sent": u.requests, "cache_hits": u.cached, "retries": u.retries, "errors": u.errors,
                        "prompt_tokens_paid": u.prompt_tokens, "completion_tokens_paid": u.completion_tokens}
    summary["estimated_cost_usd"] = round(u.cost(conf), 4)
    price_in, price_out, source = teacher_prices(conf)
    summary["price"] = {"in_per_mtok": price_in, "out_per_mtok": price_out, "source": source}
    if source == "unknown":
        summary.setdefault("warnings", []).append(
            f"teacher.model={conf.model!r} is not in the price table and no teacher.price_* is set: the cost "
            f"(${summary['estimated_cost_usd']}) counts its {u.prompt_tokens + u.completion_tokens:,} paid tokens as free")
    summary["decontam"] = _decontam_report(cfg)
    summary["teacher"] = {"provider": conf.provider, "base_url": conf.base_url, "model": conf.model}
    return summary


def _contamination_index(cfg: Config):
    from scoder_ray.quality import contamination_index

    return contamination_index(cfg.quality, dict(cfg.evaluate.problems))


def _decontam_report(cfg: Config) -> dict[str, Any]:
    from scoder_ray.quality import decontam_report

    return decontam_report(cfg.quality, dict(cfg.evaluate.problems))


def _file_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of a samples file: JSONL lines (`path:N`) or Parquet rows (`path row N`); a field of the
    wrong type is an error naming its line, before anything is written."""
    if path.endswith(".parquet"):
        try:
            fs, where = filesystem(path)
            table = pq.read_table(where, filesystem=fs)
        except Exception as e:  # Arrow names neither the file nor what it expected
            raise ValueError(f"teacher.samples_file {path}: not a readable Parquet file ({e})") from None
        missing = [c for c in ("problem", "solution") if c not in table.column_names]
        if missing:
            raise ValueError(f"teacher.samples_file {path}: missing column(s) {', '.join(missing)}")
        rows = [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    else:
        from scoder_ray import jsonl

        rows = [(f"{path}:{n}", r) for n, r in jsonl.records(path)]
    for where, r in rows:
        for field in ("problem", "solution", "snippet", "seed_id", "lang"):
            if r.get(field) is not None and not isinstance(r[field], str):
                raise ValueError(f"teacher.samples_file {where}: `{field}` is {type(r[field]).__name__}, expected a string")
    if not rows:
        raise ValueError(f"teacher.samples_file {path}: no samples")
    return rows


def _from_file(path: str, out_uri: str, cfg: Config) -> dict[str, Any]:
    """A user's samples in place of the teacher's, through the same gates. The synthesizer learns snippet ->
    sample, so a row without its snippet is rejected (`missing_snippet`), as is a repeat of an earlier row."""
    from scoder_ray.quality import echo_phrases, gate

    index, echoes = _contamination_index(cfg), echo_phrases(prompts.instruction(cfg.prompts.synthesizer))
    rows, seen = [], set()
    for i, (where, r) in enumerate(_file_rows(path)):
        problem, solution = (r.get("problem") or "").strip(), (r.get("solution") or "").strip()
        snippet = (r.get("snippet") or "").strip()
        reason = ("empty_problem" if not problem else "empty_solution" if not solution
                  else "missing_snippet" if not snippet else "duplicate" if (problem, solution) in seen else "")
        seen.add((problem, solution))
        if not reason:
            try:
                compile(solution, "solution.py", "exec")
            except (SyntaxError, ValueError):
                reason = "solution_syntax_error"
        reason = reason or gate(problem, solution, snippet, cfg.quality, index, echoes)
        rows.append({"seed_id": r.get("seed_id") or hashlib.sha1(f"file:{i}:{problem}".encode()).hexdigest()[:16],
                     "snippet": snippet, "lang": r.get("lang") or "python", "problem": problem,
                     "solution": solution, "raw": "",
                     "teacher": f"file:{path.rsplit('/', 1)[-1]}", "finish_reason": "", "prompt_tokens": 0,
                     "completion_tokens": 0, "parse_ok": not reason, "reason": reason})
    summary = _write(rows, out_uri, _execute(rows, cfg))
    summary["usage"] = {"requests_sent": 0}
    summary["decontam"] = _decontam_report(cfg)
    return summary


def _execute(rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Run every sample that passed the gates in the sandbox (`quality.exec_teacher_samples`): one that does
    not run or fails its stated examples becomes `exec_failed`, with the sandbox's reason. Counts for _DONE.json."""
    from scoder_ray.score.execution import sandbox_verdicts, stated_examples

    if not cfg.quality.exec_teacher_samples:
        return {"ran": 0, "off": True}
    gated = [r for r in rows if r["parse_ok"]]
    ids = [str(i) for i in range(len(gated))]  # a samples file may repeat a seed_id
    verdicts = sandbox_verdicts(ids, [r["problem"] for r in gated], [r["solution"] for r in gated],
                                cfg.score.exec_timeout_s, cfg.score.exec_workers, cfg.evaluate.isolation)
    for i, r in zip(ids, gated):
        verdict, why = verdicts[i]
        if verdict != "passed":
            r.update(parse_ok=False, reason="exec_failed", exec_reason=f"{verdict}: {why}"[:300])
    return {"ran": len(gated), "passed": sum(r["parse_ok"] for r in gated),
            "with_examples": sum(bool(stated_examples(r["problem"])) for r in gated)}


# What to do when every teacher sample was rejected, by the most common reason.
HINTS = {
    "no_examples": "quality.require_examples=true keeps only problems that state `assert` examples: a teacher is asked "
                   "for them by prompts.synthesizer=with_examples (or a template of yours that asks), a samples file "
                   "must hold them; or set quality.require_examples=false",
    "exec_failed": "each failed in the sandbox (`exec_reason` says why; quality.exec_teacher_samples=false keeps them unrun)",
    "undefined_name": "their solutions read names they neither define nor import (a helper of the seed's module, `np` "
                      "with no `import numpy as np`): ask for self-contained solutions (prompts.synthesizer), or set "
                      "quality.reject_undefined_names=false",
    "prompt_too_long": "the teacher's context cannot hold the prompts: lower seeds.max_lines or seeds.max_chars",
}


def nothing_kept(done: dict[str, Any], rejected_uri: str) -> str:
    """Why there is nothing to train the synthesizer on when the bootstrap kept no sample: its rejections by reason,
    where the rows are, and what to do about the most common reason."""
    reasons = sorted(done.get("rejected", {}).items(), key=lambda kv: -kv[1])
    hint = HINTS.get(reasons[0][0].split(":")[-1], "") if reasons else ""
    return (f"the bootstrap kept none of its {done.get('requested', 0)} teacher samples "
            f"({', '.join(f'{k} {v}' for k, v in reasons) or 'none requested'}; each with its reason in {rejected_uri})"
            + (f": {hint}" if hint else "") + "; then rerun: a changed config or samples file redoes the bootstrap, "
            "and a teacher's answers come from its cache")


def _write(rows: list[dict[str, Any]], out_uri: str, executed: dict[str, Any]) -> dict[str, Any]:
    schema = pa.schema([(c, pa.bool_() if c == "parse_ok" else pa.int64() if c.endswith("_tokens") else pa.string())
                        for c in COLUMNS])
    rows = [{"exec_reason": "", **r} for r in rows]
    kept = [r for r in rows if r["parse_ok"]]
    rejected = [r for r in rows if not r["parse_ok"]]
    write_table(f"{out_uri}/data/part-0.parquet", pa.Table.from_pylist(kept, schema=schema))
    write_table(f"{out_uri}/rejected/part-0.parquet", pa.Table.from_pylist(rejected, schema=schema))
    reasons = dict(sorted(Counter(r["reason"] for r in rejected).items()))
    warnings = ([f"only {len(kept)} of {len(rows)} teacher samples passed the parser, the quality gates and the "
                 f"sandbox: {reasons}"] if len(kept) < len(rows) / 2 else [])
    return {"rows": len(kept), "requested": len(rows), "parse_rate": round(len(kept) / max(1, len(rows)), 4),
            "rejected": reasons, "execution": executed, "warnings": warnings}
