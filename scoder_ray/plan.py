"""`scoder-ray plan`: before any work, what a config will cost — per stage the GPUs it holds, the engines,
actors and workers it starts, and estimated GPU-hours and wall time — from the volumes the config implies
and the per-GPU throughput in conf/throughput.yaml (each number there says where it was measured or that it
is assumed). Stages run one after another, so the wall time is their sum; a stage holds its GPUs for its
whole wall time, start-ups included. The CPU stages get a wall time and no GPU-hours: the seed pool on the
head's CPUs (the one node sure to be up before any GPU is asked for), the bootstrap from the teacher's
latency and `teacher.max_concurrency`, with its cost at the teacher's price. Pools are sized as the run
sizes them (ray_env.pool_sizes): a sampling stage's checkpoint pools and an influence stage's feature pools side by side (`ray.parallel_checkpoints`),
sharing `ray.gpu_budget` (by default what `ray.cluster_config` scales to).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from scoder_ray.config import CONF_DIR, Config
from scoder_ray.generate.kept_engines import scorer_keep_reason
from scoder_ray.ray_env import gpu_budget, pool_sizes
from scoder_ray.train.data import validation_count

THROUGHPUT = CONF_DIR / "throughput.yaml"


@dataclass
class StagePlan:
    stage: str
    volume: str  # what the stage processes, in words
    gpus: int  # held at once (0: a CPU stage)
    starts: int  # engines, actors or training runs started
    gpu_hours: float
    wall_hours: float


def load_throughput(path: Optional[str] = None) -> dict[str, Any]:
    """conf/throughput.yaml, with the numbers of `path` (yours: all of them, or only those you measured) over it."""
    with open(THROUGHPUT, encoding="utf-8") as f:
        tp = yaml.safe_load(f)
    if path:
        with open(path, encoding="utf-8") as f:
            mine = yaml.safe_load(f) or {}
        if not isinstance(mine, dict):
            raise ValueError(f"{path}: expected a mapping of throughput numbers, as in {THROUGHPUT}")
        unknown = sorted(set(mine) - set(tp))
        if unknown:
            raise ValueError(f"{path}: unknown throughput key(s) {', '.join(unknown)}; the keys are those of {THROUGHPUT}")
        tp.update(mine)
    return tp


def seed_files(cfg: Config) -> tuple[int, int, int]:
    """(code files on disk, records of `hf:` sources, rows of JSONL/Parquet snippet files) the seed stage
    reads: local sources are listed (a folder this machine lacks counts 0), an `hf:` source counts its
    `limit=` (without one, 0: its size is unknown here; a record is a file, as in The Stack), a snippet file
    its rows (one snippet each)."""
    from scoder_ray.seeds import RECORD_SUFFIXES, hf_limit, source_files

    files = records = rows = 0
    for src in cfg.seeds.sources:
        if src.startswith("hf:"):
            records += hf_limit(src)
            continue
        try:
            for item in source_files([src], cfg.seeds.languages):
                if item["abs"].endswith(RECORD_SUFFIXES):
                    rows += records_in(item["abs"]) or 0
                else:
                    files += 1
        except ValueError:  # not on this machine (e.g. a path on the cluster's head)
            pass
    return files, records, rows


def records_in(path: str) -> Optional[int]:
    """Rows of a JSONL (non-blank lines) or Parquet (its footer) file, local or in an object store; None
    where it cannot be read from here."""
    from scoder_ray.store import filesystem

    try:
        fs, where = filesystem(path)
        with fs.open_input_file(where) as f:
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq

                return pq.ParquetFile(f).metadata.num_rows
            count, rest = 0, b""
            while chunk := f.read(1 << 24):  # a seed file may be gigabytes: counted in chunks
                *lines, rest = (rest + chunk).split(b"\n")
                count += sum(1 for line in lines if line.strip())
            return count + bool(rest.strip())
    except (OSError, ValueError):
        return None


def head_cpus(cfg: Config) -> int:
    """CPUs the seed stage has: the head's in `ray.cluster_config`, else this machine's."""
    if cfg.ray.cluster_config:
        from scoder_ray.cluster import node_types
        from scoder_ray.config import cluster_config_path

        head = next((t for t in node_types(str(cluster_config_path(cfg))) if t.head and t.cpus), None)
        if head:
            return head.cpus
    return os.cpu_count() or 1


def plan(cfg: Config, tp: dict[str, Any]) -> list[StagePlan]:
    out: list[StagePlan] = []
    budget = total = gpu_budget(cfg)
    kept = 0  # GPUs of scorer engines kept from one iteration's scoring to the next (generate/kept_engines.py)
    g = cfg.engine.gpus_per_engine

    def add(stage: str, volume: str, gpus: int, starts: int, work_gpu_s: float, start_s: float) -> None:
        """work_gpu_s: GPU-seconds of work, spread over `gpus`; start_s: the stage's start-up wall time."""
        if gpus <= 0:
            out.append(StagePlan(stage, volume, 0, starts, 0.0, 0.0))
            return
        wall_s = work_gpu_s / gpus + start_s
        out.append(StagePlan(stage, volume, gpus, starts, gpus * wall_s / 3600, wall_s / 3600))

    def pools(n: int, per_unit: float, size: int, at_most: int, blocks: float = 0) -> tuple[int, int, int]:
        """(GPUs held at once, units started, waves of start-ups) for n pools side by side as the run sizes them
        (no more units in a pool than the blocks of `blocks` rows it gets)."""
        sizes = pool_sizes(n, per_unit, size, budget, at_most)
        if blocks:
            sizes = [max(1, min(s, math.ceil(blocks / n))) for s in sizes]
        return int(sum(sizes) * per_unit), sum(sizes[i % len(sizes)] for i in range(n)), -(-n // len(sizes))

    def train(stage: str, conf, rows: float, epochs: int) -> None:
        held = validation_count(conf.val_size, int(rows))  # held out of training, evaluated instead
        rows -= held
        tokens = rows * epochs * tp["train_example_tokens"]
        seconds = tokens / tp["train_tokens_per_s"]
        volume = f"{rows:,.0f} rows x {epochs} epochs = {tokens / 1e6:,.1f}M tokens"
        if held:
            steps = conf.max_steps or rows * epochs // (conf.num_workers * conf.micro_batch_size * conf.grad_accum)
            evals = (int(steps // conf.eval_steps) if conf.eval_steps else 0) + conf.num_checkpoints
            # a forward pass is about a third of a training step's forward + backward
            seconds += evals * held * tp["train_example_tokens"] / (3 * tp["train_tokens_per_s"])
            volume += f", {held:,} held out x {evals} evaluations"
        add(stage, volume, conf.num_workers * conf.gpus_per_worker, 1, seconds, tp["train_start_s"])

    def generate(stage: str, rows: float, tokens_each: float, n: int = 1, at_most: int = 1) -> None:
        """`n` engine pools, side by side as sampling runs them (`at_most` at once, 0: all)."""
        tokens = rows * tokens_each
        gpus, starts, waves = pools(n, g, cfg.engine.num_engines, at_most, rows / cfg.sample.batch_size)
        add(stage, f"{rows:,.0f} rows, {tokens / 1e6:,.1f}M generated tokens", gpus, starts,
            tokens / tp["generation_tokens_per_s"], waves * tp["engine_start_s"])

    files, records, rows = seed_files(cfg)
    snippets = (files + records) * tp["seeds_snippets_per_file"] + rows
    cpus = head_cpus(cfg)
    seeds_s = (records / tp["seeds_hub_records_per_s"] + (files + records + rows) / (cpus * tp["seeds_files_per_cpu_s"])
               + snippets / tp["seeds_driver_snippets_per_s"])
    volume = ", ".join(([f"{files + records:,} files"] if files + records else [])
                       + ([f"{rows:,} snippet rows"] if rows else [])) + f", ~{snippets:,.0f} snippets on {cpus} CPUs"
    if not files + records + rows:
        volume = "unknown: an hf: source without limit= (or sources not on this machine)"
    out.append(StagePlan("seeds", volume, 0, 0, 0.0, seeds_s / 3600))
    teacher_rows = cfg.teacher.num_seeds
    if cfg.teacher.samples_file:  # every row of the file, whatever teacher.num_seeds says
        from scoder_ray.seeds import resolve_rows_file

        counted = records_in(resolve_rows_file(cfg.teacher.samples_file))
        teacher_rows = counted if counted is not None else teacher_rows
        out.append(StagePlan("bootstrap", f"{teacher_rows:,} rows from teacher.samples_file"
                             + ("" if counted is not None else " (unreadable here: teacher.num_seeds assumed)"), 0, 0, 0.0, 0.0))
    else:
        from scoder_ray.generate.prices import teacher_prices

        p_in, p_out, _ = teacher_prices(cfg.teacher)
        usd = teacher_rows * (tp["teacher_prompt_tokens"] * p_in + tp["teacher_output_tokens"] * p_out) / 1e6
        cost = f", ~${usd:,.2f} at {cfg.teacher.model}'s price" if p_in or p_out else ""
        wall_s = math.ceil(teacher_rows / max(1, cfg.teacher.max_concurrency)) * tp["teacher_request_s"]
        out.append(StagePlan("bootstrap", f"{teacher_rows:,} teacher requests{cost}", 0, 0, 0.0, wall_s / 3600))
    syn = cfg.train.synthesizer
    train("train_synthesizer", syn, teacher_rows, syn.epochs)
    pool = cfg.sample.num_seeds or cfg.seeds.max_snippets
    m, n = syn.num_checkpoints, cfg.sample.samples_per_seed
    kept_total = 0.0
    wu = cfg.train.warmup
    inf = cfg.influence
    for t in range(1, cfg.loop.iterations + 1):
        it = f"iter_{t:02d}"
        cands = pool * m * n
        generate(f"{it}/sample", cands, tp["sample_output_tokens"], m, cfg.ray.parallel_checkpoints)  # a pool per checkpoint
        scored = cands * tp["parse_rate"]
        score_gpu_s = (scored * tp["score_prompt_tokens"] / tp["prefill_tokens_per_s"]
                       + scored * cfg.score.max_tokens / tp["generation_tokens_per_s"])
        budget = total  # the kept scorer's GPUs are its own again
        if kept:  # the last iteration's scorer engines, already started
            gpus, starts, start_s = kept, 0, 0.0
        else:
            gpus, starts, _ = pools(1, g, cfg.engine.num_engines, 1, scored / cfg.sample.batch_size)
            start_s = tp["engine_start_s"]
        add(f"{it}/score", f"{scored:,.0f} candidates scored", gpus, starts, score_gpu_s, start_s)
        kept = 0 if scorer_keep_reason(cfg, t, gpus // g if g else 0, total) else gpus
        budget = max(1, total - kept) if total else 0  # as ray_env.gpu_budget says while engines are kept
        selected = pool * cfg.score.top_k
        warm_rows = max(inf.warmup_min_rows, inf.warmup_fraction * selected)
        train(f"{it}/warmup", wu, warm_rows, wu.epochs)
        examples = (selected + teacher_rows) * wu.num_checkpoints
        rate = tp["influence_examples_per_s"] * tp["influence_tokens_at_rate"] / tp["influence_example_tokens"]
        # a feature pool per (checkpoint, candidates | teacher samples), side by side as the run sizes them
        gpus, starts, waves = pools(wu.num_checkpoints * 2, inf.gpus_per_actor, inf.num_actors,
                                    2 * cfg.ray.parallel_checkpoints)
        add(f"{it}/influence", f"{examples:,.0f} examples ({wu.num_checkpoints} checkpoints)",
            gpus, starts, examples / rate, waves * tp["actor_start_s"])
        kept_total += inf.keep_count or inf.keep_fraction * selected
        retrain_rows = teacher_rows + kept_total
        train(f"{it}/train", syn, retrain_rows, cfg.loop.retrain_epochs or syn.epochs)  # the stage's own name
    final_rows = cfg.loop.final_dataset_size / tp["parse_rate"] * tp.get("final_oversample", 1.25)
    generate("final", final_rows, tp["sample_output_tokens"])
    train("train_scoder", cfg.train.scoder, cfg.loop.final_dataset_size, cfg.train.scoder.epochs)
    # HumanEval+ and MBPP+ are their base sets' prompts with more tests: one generation serves both (evaluate/stage.py)
    per_family: dict[str, int] = {}
    for b in cfg.evaluate.benchmarks:
        family = b.rstrip("+")
        per_family[family] = max(per_family.get(family, 0), tp["evaluate_problems"].get(b, 0))
    problems = sum(min(n, cfg.evaluate.limit) if cfg.evaluate.limit else n for n in per_family.values())
    models = 2 if cfg.evaluate.compare_base else 1
    generate("evaluate", problems * cfg.evaluate.num_samples * models, tp["evaluate_output_tokens"], models)  # one after another
    return out


def render(cfg: Config, stages: list[StagePlan], tp: dict[str, Any]) -> str:
    lines = [f"plan for run {cfg.run.id}: throughput per {tp['gpu']} GPU from {tp.get('_source', THROUGHPUT)}",
             f"{'stage':<28} {'GPUs':>5} {'starts':>6} {'GPU-h':>8} {'wall h':>7}  volume"]
    for s in stages:
        gpus = str(s.gpus) if s.gpus else "cpu"
        hours = f"{s.gpu_hours:8.1f} {s.wall_hours:7.2f}" if s.gpus else f"{'-':>8} {s.wall_hours:7.2f}"
        lines.append(f"{s.stage:<28} {gpus:>5} {s.starts:>6} {hours}  {s.volume}")
    total_gpu_h = sum(s.gpu_hours for s in stages)
    total_wall = sum(s.wall_hours for s in stages)
    peak = max((s.gpus for s in stages), default=0)
    lines.append(f"{'total':<28} {peak:>5} {sum(s.starts for s in stages):>6} {total_gpu_h:8.1f} {total_wall:7.2f}"
                 "  (GPUs: the most held at once)")
    return "\n".join(lines)
