"""Multi-checkpoint sampling: each of the M synthesizer checkpoints writes N candidates per seed.

Per checkpoint, a Ray Data pipeline runs over a pool of vLLM actors (`engine.num_engines`, or a share of
`ray.gpu_budget`). We use a
`map_batches` actor class holding `vllm.LLM` rather than `ray.data.llm`'s processor because we need
(1) a sampling seed per row — vLLM takes a list of SamplingParams, one per prompt, so a candidate is
the same whatever batch it lands in; (2) an engine that cannot start to fail the stage with its reason
instead of being restarted forever (ray-project/ray#59986); and (3) the same engine code for the
scorer. A killed actor is restarted and its block retried (bounded retries), and since every row's
seed and id derive from (run seed, seed_id, checkpoint, sample index), retried blocks reproduce the
same candidates: no id goes missing or appears twice.

Output rows (`iter_TT/sample/data/`): cand_id, seed_id, iteration, ckpt, sample_idx, snippet, problem,
solution, raw, parse_ok, reason, tokens, truncated (cut at sample.max_tokens). A seed whose prompt the engine's
context (engine.max_model_len) cannot hold is not sent: its candidates are empty, reason `prompt_too_long`.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

from scoder_ray import prompts
from scoder_ray.config import Config, EngineConf, ModelsConf, QualityConf, SampleConf, engine_sections, prompt_sections
from scoder_ray.lineage import derived_seed, pick_seeds, synthesizer_checkpoints, synthesizer_digest
from scoder_ray.ray_env import actor_pool, gpu_budget, gpu_options, in_blocks, pool_sizes, side_by_side
from scoder_ray.seeds import seeds_uri
from scoder_ray.store import RunStore, resumed_rows

ACTOR_MAX_RESTARTS = 3  # a killed engine comes back; an engine that keeps dying fails the stage
START_RETRY_PAUSE_S = 5.0  # before an engine that failed to start is tried once more, in a fresh actor
EXIT_GRACE_S = 10.0  # an idle engine's dead core is a death only if the actor is not exiting by then


def cand_id(iteration: int, ckpt: str, seed_id: str, sample_idx: int) -> str:
    return hashlib.sha1(f"{iteration}:{ckpt}:{seed_id}:{sample_idx}".encode()).hexdigest()[:16]


class EngineActor:
    """Holds one vLLM engine (AsyncLLM): `engine.blocks_in_flight` blocks are served at once, each an
    `async __call__` on Ray Data's event loop, their requests in one continuous batch. An engine that fails to
    start is tried once more in a fresh actor; the second failure is kept and raised on the first batch, so
    the stage fails with the engine's own message rather than restarting a broken actor forever
    (ray-project/ray#59986)."""

    def __init__(self, model_path: str, engine: EngineConf, seed: int, models: ModelsConf, progress: Any = None):
        from scoder_ray.generate.engine import failure_context, make_async_llm, pin_to_free_cores
        from scoder_ray.model_cache import local_model

        self.progress = progress  # the stage's progress actor (scoder_ray.progress), told of every block done
        self.max_model_len = engine.max_model_len
        self.error: Optional[str] = None
        self.requests = 0
        self.stopping = threading.Event()
        started = time.perf_counter()
        if not engine.gpus_per_engine:
            pin_to_free_cores(engine.cpus_per_engine)  # before vLLM starts: its processes inherit the affinity
        try:  # the model folder on this node (a copy from the run root, or built here): see model_cache
            self.llm = make_async_llm(engine, local_model(model_path, models), seed)
            self.tokenizer = self.llm.get_tokenizer()
            watch_engine_core(self.llm.engine_core, self.stopping)
            atexit.register(self.shutdown)
        except Exception as e:  # noqa: BLE001 - reported on the first batch, with the cause
            self.error = f"vLLM engine for {model_path} failed to start: {type(e).__name__}: {e} ({failure_context()})"
            if first_life():  # a start can fail for a passing reason: a core killed for memory, say
                time.sleep(START_RETRY_PAUSE_S)
                replace_actor(f"{self.error}: starting once more in a fresh actor")
        self.start_s: Optional[float] = time.perf_counter() - started

    def shutdown(self) -> None:
        """Stop the engine (once), at the actor's exit while modules still stand (vLLM's own finaliser, run
        during interpreter teardown, raises "'NoneType' object is not callable" into the job's log)."""
        self.stopping.set()
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.shutdown()
            del llm  # the last reference: AsyncLLM's finaliser runs now, not at teardown

    def startup_column(self, n: int) -> np.ndarray:
        """`engine_start_s`: this engine's start-up time on the first row it returns, 0 after, so a stage
        can tell Ray/engine overhead from generation (bench/loop.py)."""
        col = np.zeros(n)
        if self.start_s is not None and n:
            col[0], self.start_s = self.start_s, None
        return col

    def check(self) -> None:
        if self.error:
            raise RuntimeError(self.error)

    async def generate(self, texts: list[str], params) -> list:
        """One finished RequestOutput per text, in order (`params`: one SamplingParams, or one per text); a text
        longer than the engine's context is not sent, and gets an empty output whose finish_reason is
        prompts.PROMPT_TOO_LONG (vLLM would refuse it, failing the whole block). An engine whose core died is
        replaced, not retried in place: see watch_engine_core."""
        import asyncio
        from types import SimpleNamespace

        per_text = params if isinstance(params, list) else [params] * len(texts)

        async def one(text: str, p) -> Any:
            if len(self.tokenizer.encode(text)) >= self.max_model_len:  # counted as vLLM counts a text prompt
                return SimpleNamespace(outputs=[SimpleNamespace(text="", token_ids=[], finish_reason=prompts.PROMPT_TOO_LONG)])
            self.requests += 1
            final = None
            async for out in self.llm.generate({"prompt": text}, p, request_id=f"r{self.requests}"):
                final = out
            return final

        try:
            return list(await asyncio.gather(*(one(t, p) for t, p in zip(texts, per_text))))
        except Exception as e:
            if any(c.__name__ == "EngineDeadError" for c in type(e).__mro__):
                replace_actor(f"the vLLM engine core of this actor died ({e})")
            raise

    def tick(self, n: int) -> None:
        from scoder_ray import progress

        progress.tick(self.progress, n)

    def chat_prompts(self, users: list[str]) -> list[str]:
        return [self.tokenizer.apply_chat_template(prompts.chat(u), tokenize=False, add_generation_prompt=True)
                for u in users]


def watch_engine_core(engine_core: Any, stopping: threading.Event, every_s: float = 0.5,
                      grace_s: float = EXIT_GRACE_S) -> None:
    """Replace this actor when its vLLM engine core dies while idle (a death mid-request is caught at once
    by `generate`). Every retry in place would meet the same dead core. A thread here polls the client's
    dead mark and ends the actor's process: Ray starts a fresh actor with a fresh engine (max_restarts) and
    hands it the blocks again (max_task_retries); the rows are seeded, so the blocks' candidates come out
    the same. Not a death: `stopping` (EngineActor.shutdown at the actor's exit), and Ray's own end of the
    actor once its pool is done, which kills the worker's child processes, the engine core first, before
    any Python hook runs; such a process is gone within `grace_s`, so the thread waits that long first."""
    resources = getattr(engine_core, "resources", None)
    if resources is None or not hasattr(resources, "engine_dead"):
        return  # an in-process engine core dies with this process

    def watch() -> None:
        while not resources.engine_dead:
            time.sleep(every_s)
        stopping.wait(grace_s)
        if not stopping.is_set() and threading.main_thread().is_alive():
            replace_actor("the vLLM engine core of this actor died")

    threading.Thread(target=watch, daemon=True, name="engine-core-watch").start()


def first_life() -> bool:
    """Whether this actor has not been restarted yet (False outside an actor)."""
    import ray

    try:
        return not ray.get_runtime_context().was_current_actor_reconstructed
    except (AssertionError, RuntimeError):
        return False


def replace_actor(why: str) -> None:
    from scoder_ray.generate.engine import failure_context

    logging.getLogger(__name__).error("%s: replacing the actor (%s)", why, failure_context())
    sys.stderr.flush()
    os._exit(1)


class Sampler(EngineActor):
    def __init__(self, model_path: str, engine: EngineConf, sample: SampleConf, seed: int, models: ModelsConf,
                 quality: Optional[QualityConf] = None, decontam_texts: Optional[dict[str, str]] = None,
                 progress: Any = None, instruction: str = prompts.SYNTH_INSTRUCTION):
        super().__init__(model_path, engine, seed, models, progress)
        from scoder_ray.evaluate.decontam import NgramIndex
        from scoder_ray.quality import echo_phrases

        self.sample, self.quality, self.instruction, self.echoes = sample, quality, instruction, echo_phrases(instruction)
        self.index = (NgramIndex(decontam_texts, n=quality.decontam_ngram, threshold=quality.decontam_threshold)
                      if quality and decontam_texts else None)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check()
        langs = batch.get("lang", [None] * len(batch["snippet"]))  # runs from before seeds had a language
        texts = self.chat_prompts([prompts.synthesizer_prompt(s, lang, self.instruction)
                                   for s, lang in zip(batch["snippet"], langs)])
        outputs = await self.generate(texts, sampling_params(self.sample, batch["sampling_seed"]))
        cols: dict[str, list] = {k: [] for k in ("problem", "solution", "raw", "parse_ok", "reason", "tokens", "truncated")}
        for snippet, out in zip(batch["snippet"], outputs):
            completion = out.outputs[0]
            problem, solution, reason = prompts.parse_sample(completion.text, snippet, self.quality, self.index, self.echoes)
            if completion.finish_reason == prompts.PROMPT_TOO_LONG:
                reason = prompts.PROMPT_TOO_LONG
            cols["problem"].append(problem)
            cols["solution"].append(solution)
            cols["raw"].append(completion.text)
            cols["parse_ok"].append(not reason)
            cols["reason"].append(reason)
            cols["tokens"].append(len(completion.token_ids))
            cols["truncated"].append(completion.finish_reason == "length")
        out_batch = {k: v for k, v in batch.items() if k != "sampling_seed"}
        out_batch.update({k: np.array(v, dtype=object if k in ("problem", "solution", "raw", "reason") else None)
                          for k, v in cols.items()})
        out_batch["engine_start_s"] = self.startup_column(len(outputs))
        self.tick(len(outputs))
        return out_batch


def sampling_params(sample: SampleConf, seeds) -> list:
    """One seeded `SamplingParams` per candidate (guided to the sample layout with sample.constrain_layout)."""
    from vllm import SamplingParams

    guided = None
    if sample.constrain_layout:
        from vllm.sampling_params import StructuredOutputsParams

        guided = StructuredOutputsParams(regex=prompts.LAYOUT_REGEX)
    return [SamplingParams(temperature=sample.temperature, top_p=sample.top_p, max_tokens=sample.max_tokens,
                           seed=int(s), structured_outputs=guided) for s in seeds]


def expand(row: dict[str, Any], iteration: int, ckpt: str, n: int, run_seed: int) -> list[dict[str, Any]]:
    return [{"cand_id": cand_id(iteration, ckpt, row["seed_id"], i), "seed_id": row["seed_id"], "iteration": iteration,
             "ckpt": ckpt, "sample_idx": i, "snippet": row["snippet"], "lang": row.get("lang") or "python",
             "sampling_seed": derived_seed(run_seed, "sample", iteration, ckpt, row["seed_id"], i)} for i in range(n)]


def engine_actor_options(engine: EngineConf, accelerator_type: str = "", engines: int = 0, blocks: int = 0) -> dict[str, Any]:
    """Pool of `engines` (default engine.num_engines; no more than the `blocks` it will get), resources (GPUs
    of `accelerator_type`, when set) and restart policy for the engine actors of a `map_batches`."""
    opts: dict[str, Any] = {"compute": actor_pool(engines or engine.num_engines, blocks, engine.blocks_in_flight),
                            "max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": ACTOR_MAX_RESTARTS}
    if engine.gpus_per_engine:
        opts.update(gpu_options(engine.gpus_per_engine, accelerator_type))
    else:
        opts["num_cpus"] = engine.cpus_per_engine  # (make_llm sets the engine's environment in the actor)
    return opts


def engine_pools(cfg: Config, pools: int = 1) -> list[int]:
    """Engines per pool for the pools of a stage that run side by side (`ray.parallel_checkpoints` of them,
    sharing `ray.gpu_budget` when one applies): see ray_env.pool_sizes."""
    return pool_sizes(pools, cfg.engine.gpus_per_engine, cfg.engine.num_engines, gpu_budget(cfg),
                      cfg.ray.parallel_checkpoints)


def sample_checkpoint(cfg: Config, seeds, iteration: int, ckpt: str, model_path: str, out_uri: str,
                      n: Optional[int] = None, progress: Any = None,
                      decontam: Optional[dict[str, str]] = None, engines: int = 0,
                      written: frozenset = frozenset()) -> int:
    """Write n (default N) candidates per seed from one checkpoint on `engines` engines (default: the stage's
    share of the GPU budget, or engine.num_engines); returns n. `progress`: the stage's progress actor.
    `written`: cand_ids a resumed attempt already holds, not generated again."""
    from scoder_ray.quality import decontam_texts

    n = n or cfg.sample.samples_per_seed
    engines = engines or engine_pools(cfg)[0]
    # Read here (the files may be on this node only), once per stage when several checkpoints share it.
    texts = decontam if decontam is not None else decontam_texts(cfg.quality, dict(cfg.evaluate.problems))[0]
    rows, batch = in_blocks(seeds.flat_map(lambda r: [c for c in expand(r, iteration, ckpt, n, cfg.run.seed)
                                                      if c["cand_id"] not in written]), cfg.sample.batch_size)
    if not rows.count():  # a resumed attempt that holds all of this checkpoint's candidates
        return n
    out = rows.map_batches(
        Sampler, fn_constructor_kwargs={"model_path": model_path, "engine": cfg.engine, "sample": cfg.sample,
                                        "seed": cfg.run.seed, "models": cfg.models, "quality": cfg.quality,
                                        "decontam_texts": texts, "progress": progress,
                                        "instruction": prompts.instruction(cfg.prompts.synthesizer)},
        batch_size=batch, batch_format="numpy",
        **engine_actor_options(cfg.engine, cfg.ray.accelerator_type, engines, rows.num_blocks()))
    # Blocks are written as they finish, in any order (in_blocks kept the input order to cut them): a
    # candidate depends on its row's seed only, and readers key rows by cand_id.
    out.context.execution_options.preserve_order = False
    # File names carry a per-write id: checkpoints never collide. No CPU for the writes: pools of several
    # checkpoints running side by side may hold every CPU of a node until their writes are done.
    out.write_parquet(f"{out_uri}/data", ray_remote_args={"num_cpus": 0})
    return n


def sample_side_by_side(cfg: Config, seeds, iteration: int, checkpoints: list[tuple[str, str]], out_uri: str,
                        progress: Any = None, written: frozenset = frozenset()) -> dict[str, Any]:
    """`sample_checkpoint` for every checkpoint, its engine pool side by side with others' as
    `engine_pools` says; returns ray_env.side_by_side's record (each pool's lifetime and size, the GPUs held)
    for the report's timeline. `written`: cand_ids already in `out_uri` (a resumed attempt)."""
    from scoder_ray.quality import decontam_texts

    # Once, before the threads: parsing the benchmark files in two threads at once broke CPython 3.11's
    # `ast.parse` ("AST constructor recursion depth mismatch", measured in a tiny-loop run).
    texts, _ = decontam_texts(cfg.quality, dict(cfg.evaluate.problems))
    jobs = {name: (lambda engines, name=name, path=path: sample_checkpoint(
        cfg, seeds, iteration, name, path, out_uri, progress=progress, decontam=texts, engines=engines,
        written=written))
        for name, path in checkpoints}
    return side_by_side(jobs, engine_pools(cfg, len(checkpoints)), cfg.engine.gpus_per_engine,
                        cfg.ray.accelerator_type)


def run_sample(cfg: Config, store: RunStore, iteration: int = 1, checkpoints: Optional[list[tuple[str, str]]] = None,
               force: bool = False) -> dict[str, Any]:
    """`iter_TT/sample` through the run store. `checkpoints`: (name, model folder) pairs; by default the
    synthesizer's checkpoints from `train_synthesizer` (iteration 1) or `iter_{T-1}/train`."""
    import ray

    from scoder_ray import progress
    from scoder_ray.quality import decontam_report

    seeds_done = store.read_done("seeds")
    if seeds_done is None:
        raise ValueError("sampling needs the seed pool: run the seeds stage first")
    if checkpoints is None:
        checkpoints = synthesizer_checkpoints(store, iteration)
    stage = f"iter_{iteration:02d}/sample"
    inputs = {"seeds": seeds_done["output_digest"], "checkpoints": ",".join(f"{n}={p}" for n, p in checkpoints),
              "synthesizer": synthesizer_digest(store, iteration)}

    def produce(tmp: str) -> dict[str, Any]:
        seeds = ray.data.read_parquet(seeds_uri(store)).select_columns(["seed_id", "snippet", "lang"])
        if cfg.sample.num_seeds:
            keep = {s["seed_id"] for s in _seed_subset(store, cfg.sample.num_seeds, cfg.run.seed, iteration)}
            seeds = seeds.filter(lambda r: r["seed_id"] in keep)
        total = seeds.count() * cfg.sample.samples_per_seed * len(checkpoints)
        written = resumed_rows(tmp + "/data", stage, total, "candidates")
        bar = progress.start(cfg.run.id, stage, total - len(written), "candidates")
        side = sample_side_by_side(cfg, seeds, iteration, checkpoints, tmp, progress=bar, written=written)
        progress.stop(bar)
        out = ray.data.read_parquet(f"{tmp}/data")
        stats = out.select_columns(["parse_ok", "reason", "tokens", "truncated", "ckpt", "engine_start_s"]).to_pandas()
        return {"rows": len(stats), "checkpoints": [n for n, _ in checkpoints],
                "samples_per_seed": cfg.sample.samples_per_seed, "parse_rate": round(float(stats["parse_ok"].mean()), 4),
                "parse_rate_by_ckpt": {k: round(float(v), 4) for k, v in stats.groupby("ckpt")["parse_ok"].mean().items()},
                "rejected": {k: int(v) for k, v in stats["reason"][stats["reason"] != ""].value_counts().items()},
                "truncated": int(stats["truncated"].sum()), "tokens": int(stats["tokens"].sum()),
                "engine_start_s": round(float(stats["engine_start_s"].sum()), 2), **side, "resumed_rows": len(written),
                "decontam": decontam_report(cfg.quality, dict(cfg.evaluate.problems))}

    sections = {"sample": cfg.sample, "quality": cfg.quality, **engine_sections(cfg), "run.seed": cfg.run.seed,
                **prompt_sections(cfg)}
    return store.run_stage(stage, sections, inputs, produce, force=force, resume=True)


def _seed_subset(store: RunStore, n: int, run_seed: int, iteration: int) -> list[dict[str, str]]:
    return pick_seeds(store, n, run_seed + 1000 * iteration)
