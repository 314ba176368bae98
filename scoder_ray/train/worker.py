"""The per-worker training loop (runs inside Ray Train's TorchTrainer workers) on DeepSpeed ZeRO.

Ray Train has set up the process group (gloo on CPU, nccl on GPU); `deepspeed.initialize` reuses it.
Each optimizer step sees the examples `Schedule` assigns it, so a worker group restarted from the last
reported checkpoint redoes exactly the steps after it: the run ends with the configured step count.

At each of the M export steps rank 0 writes `ckpt_XX/` into the stage output: a plain HF model folder
(full fine-tuning; ZeRO-3 shards are gathered first) or a PEFT adapter folder (LoRA), plus, for LoRA,
the Adam moments in optimizer/ (see MOMENTS_FORMAT), and export_check/probe.safetensors: the training
model's logits on a probe sequence, which the exported folder must reproduce. `checkpoints.json` lists them with their step, the mean
learning rate of the interval each closes and the held-out loss; `metrics.jsonl` holds per-step loss, lr, tokens/s,
step time, and `eval_loss` at the steps that evaluated the held-out rows (train.*.val_size, eval_steps).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

MOMENTS_FORMAT = """Adam moments of a LoRA run, in each checkpoint's optimizer/ folder:
  exp_avg.safetensors     first moment m, one tensor per trainable parameter
  exp_avg_sq.safetensors  second moment v, same keys
  optimizer.json          {"step": optimizer steps taken, "betas": [b1, b2], "eps": eps, "lr": last lr}
Keys are exactly the keys of the checkpoint's adapter_model.safetensors (PEFT's names, adapter name
removed), so moments and adapter weights cannot be mismatched (cf. princeton-nlp/LESS#10). Moments are
fp32, as the optimizer holds them (bias correction not applied).
"""


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    conf = config["train"]
    on_gpu = conf["gpus_per_worker"] > 0
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _skip_shm_comm_op()
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scoder_ray.store import write_text
    from scoder_ray.train.data import Schedule, collate, loss_tokens, lr_lambda, read_examples

    from scoder_ray.model_cache import local_model

    config["model_path"] = local_model(config["model_ref"], config["models"])  # on this worker's node
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(conf["precision"], torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    betas, eps = (0.9, 0.999), 1e-8
    ds_config = deepspeed_config(conf, world, betas, eps)
    if conf["zero_stage"] == 3:
        # Each rank builds the model already partitioned (transformers' `deepspeed.zero.Init` while this
        # object lives) and loads the weights one file at a time into its share: no full copy per rank.
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # Ray Train's group: zero.Init's world
        zero3_load = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay referenced until the model exists
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=dtype)
    loaded = {"params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
              "params_on_rank0": sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())}
    lora = conf["lora"]
    torch.manual_seed(config["seed"])  # the adapter's initial weights: the same on every rank and every run
    if lora["enabled"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    torch.manual_seed(config["seed"] * 1000 + rank)  # dropout: reproducible, different data-parallel ranks differ
    if on_gpu:
        model.gradient_checkpointing_enable()
        if lora["enabled"]:
            model.enable_input_require_grads()

    examples = read_examples(config["tokenized_uri"], conf["packing"], conf["max_len"])
    sched = Schedule(len(examples), world, conf["micro_batch_size"], conf["grad_accum"], conf["epochs"],
                     conf["max_steps"], config["seed"], lengths=[len(ids) for ids, _ in examples],
                     group_steps=conf["length_group_steps"])
    total = sched.total_steps
    exports = sched.checkpoint_steps(conf["num_checkpoints"], conf["checkpoint_at"])
    config["probe_ids"] = list(examples[0][0][:32])
    covered = [loss_tokens(labels) for _, labels in examples]
    held_out = read_examples(config["val_uri"], False, conf["max_len"]) if config.get("val_uri") else []

    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule_fn = lr_lambda(total, conf["warmup_ratio"], conf["lr_schedule"])
    if on_gpu:  # DeepSpeed's fused Adam (or its CPU Adam when offloading), built from the config
        optimizer = None
        lr_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn)  # noqa: E731
    else:  # a torch optimizer: DeepSpeed's own CPU ops would JIT-compile for minutes (SETUP.md)
        optimizer = torch.optim.AdamW(trainable, lr=conf["lr"], betas=betas, eps=eps, weight_decay=conf["weight_decay"])
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config)

    state = {"step": 0, "history": [], "exports": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group: continue after the last reported step
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state", load_module_strict=not conf["lora"]["enabled"])
            rng = os.path.join(d, f"rng_rank{rank}.pt")
            if os.path.exists(rng):  # dropout masks (LoRA's) as the uninterrupted run draws them
                _set_rng(torch.load(rng, weights_only=False))
            with open(os.path.join(d, "train_state.json")) as f:
                state = json.load(f)
        if rank == 0:
            say(f"training resumes after step {state['step']} of {total} from {checkpoint.path}")
    out_uri = config["out_uri"]
    progress = Progress(config.get("stage", "training"), total, state["step"]) if rank == 0 else None
    uploads = ExportUploads()  # rank 0's exports, uploaded while the steps go on
    pending = None  # a resume state waiting for the exports before it to be uploaded

    for step in range(state["step"], total):
        start = time.perf_counter()
        lr = lr_scheduler.get_last_lr()[0]
        sums = [0.0, 0.0, 0.0]  # micro-batch losses, tokens, positions computed (tokens + padding)
        # The step's loss is the mean over every token it covers, on all ranks and micro-steps, whatever the
        # batches' make-up (HF's num_items_in_batch): a micro-batch's token sum is divided by the step's token
        # count, times the world x accumulation that DeepSpeed's gradient averaging divides by again. A plain
        # per-micro-batch mean would weigh a token of a batch of short examples more (length grouping makes
        # such batches).
        per_micro = sum(covered[i] for i in sched.step_examples(step)) / (world * conf["grad_accum"])
        for micro in range(conf["grad_accum"]):
            batch = collate([examples[i] for i in sched.indices(step, micro, rank)], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch, num_items_in_batch=max(per_micro, 1e-9)).loss
            engine.backward(loss)
            engine.step()
            sums = [sums[0] + loss.item(), sums[1] + float(batch["attention_mask"].sum()),
                    sums[2] + float(batch["attention_mask"].numel())]
        # rank 0 uploading an export: every rank learns it from the all-reduce
        loss_total, tokens, positions, uploading = reduced(sums + [float(rank == 0 and uploads.busy())], device)
        peak = reduced([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device, "max")[0]
        seconds = time.perf_counter() - start
        metrics = {"step": step + 1, "loss": loss_total / (world * conf["grad_accum"]), "lr": lr,
                   "tokens": int(tokens), "tokens_per_s": tokens / seconds,
                   "step_time_s": seconds, "epoch": step // sched.steps_per_epoch,
                   "padding": round(1 - tokens / positions, 4), "peak_rss_gib_max_worker": round(peak, 3)}
        is_export = step + 1 in exports
        if held_out and (is_export or (conf["eval_steps"] and (step + 1) % conf["eval_steps"] == 0)):
            t = time.perf_counter()
            metrics["eval_loss"] = held_out_loss(engine, held_out, conf["micro_batch_size"], world, rank,
                                                 tokenizer.pad_token_id, device)
            metrics["eval_s"] = round(time.perf_counter() - t, 3)
        state["history"].append(metrics)
        state["step"] = step + 1
        if progress:
            progress.step(metrics)
        uploads.stepped()
        if is_export:
            name = f"ckpt_{exports.index(step + 1) + 1:02d}"
            _export(engine, model, tokenizer, conf, config, f"{out_uri}/{name}", rank, betas, eps, lr, uploads)
            start_step = state["exports"][-1]["step"] if state["exports"] else 0
            lrs = [h["lr"] for h in state["history"] if start_step < h["step"] <= step + 1]
            state["exports"].append({"name": name, "step": step + 1, "mean_lr": sum(lrs) / len(lrs),
                                     **({"eval_loss": metrics["eval_loss"]} if "eval_loss" in metrics else {})})
        # Resume state (weights, optimizer, this loop's state) at each export and every resume_every steps,
        # never after the last step: nothing resumes from there, and for a 7B model under ZeRO-3 it is ~100 GB.
        # A LoRA run keeps the trainable parameters only: the frozen base is reloaded from its reference.
        resumable = is_export or (conf["resume_every"] and (step + 1) % conf["resume_every"] == 0)
        # Uploaded by Ray Train's background thread (the local copy deleted after): the steps go on meanwhile,
        # and the state is registered, i.e. resumed from, only once its upload is complete. Every report is
        # ASYNC: a SYNC one waits for the uploads queued before it (Ray Train keeps reports in order).
        # A state is reported only when no export before it is still uploading: resumed from a state past an
        # export whose upload died with the worker, the run would never write that export again.
        if resumable and step + 1 < total:
            if pending:
                shutil.rmtree(pending, ignore_errors=True)  # superseded by a later state
            pending = tempfile.mkdtemp(prefix="scoder-train-")
            engine.save_checkpoint(pending, tag="state", exclude_frozen_parameters=conf["lora"]["enabled"])
            torch.save(_get_rng(), os.path.join(pending, f"rng_rank{rank}.pt"))  # each rank's own, merged by Ray Train
            if rank == 0:
                with open(os.path.join(pending, "train_state.json"), "w") as f:
                    json.dump(state, f)
        if pending and not is_export and not uploading:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(pending),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            pending = None
        else:
            ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    if pending:
        shutil.rmtree(pending, ignore_errors=True)  # training is over: nothing resumes from it
    uploads.join()  # the stage's output is complete only with every export in it
    for export in state["exports"]:
        export.update(uploads.timings.get(export["name"], {}))

    if rank == 0:
        write_text(f"{out_uri}/metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state["history"]))
        write_text(f"{out_uri}/checkpoints.json", json.dumps(
            {"total_steps": total, "steps_per_epoch": sched.steps_per_epoch, "examples": len(examples),
             "held_out_examples": len(held_out), "checkpoints": state["exports"], "loaded": loaded,
             "padding": _padding(state["history"])}, indent=2))


def held_out_loss(engine, held_out: list, micro: int, world: int, rank: int, pad_id: int, device) -> float:
    """Mean loss per response token over the held-out examples, shared out over the ranks in micro-batches of
    similar length. Collective: under ZeRO-3 every forward gathers parameters from every rank, so each rank
    runs the same number of forwards (a rank without a batch in the last round repeats one, not counted)."""
    import torch

    from scoder_ray.train.data import collate, loss_tokens

    order = sorted(range(len(held_out)), key=lambda i: (len(held_out[i][0]), i))
    batches = [order[i:i + micro] for i in range(0, len(order), micro)]
    loss_sum = tokens = 0.0
    engine.eval()
    with torch.no_grad():
        for first in range(0, len(batches), world):
            mine = first + rank < len(batches)
            examples = [held_out[i] for i in batches[first + rank if mine else 0]]
            batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
            loss = engine(**batch, num_items_in_batch=1.0, use_cache=False).loss  # a sum over the batch's tokens
            if mine:
                loss_sum, tokens = loss_sum + loss.item(), tokens + sum(loss_tokens(labels) for _, labels in examples)
    engine.train()
    loss_sum, tokens = reduced([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1.0)


def reduced(values: list[float], device, op: str = "sum") -> list[float]:
    """A few numbers summed (or their max) over the ranks. The tensor lives on the training device: on GPUs
    Ray Train's process group is NCCL alone, which has no CPU tensors."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _padding(history: list[dict[str, Any]]) -> float:
    """Share of the positions the steps computed that were padding (train.length_group_steps keeps it low)."""
    tokens = sum(h["tokens"] for h in history)
    computed = sum(h["tokens"] / (1 - h.get("padding", 0.0)) for h in history)
    return round(1 - tokens / computed, 4) if computed else 0.0


class Progress:
    """Rank 0's progress line: at the first step, about every 5% of the steps, and the last; the console
    shows it (a worker's `[scoder-ray]` line), where Ray Train's own per-step reports are left out."""

    def __init__(self, stage: str, total: int, done: int):
        self.stage, self.total, self.start_step, self.started = stage, total, done, time.time()
        self.every = max(1, total // 20)

    def step(self, m: dict[str, Any]) -> None:
        s = m["step"]
        if s != self.start_step + 1 and s % self.every and s != self.total and "eval_loss" not in m:
            return
        from scoder_ray.progress import eta

        rate = (s - self.start_step) / max(time.time() - self.started, 1e-9)
        held_out = f", held-out loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
        say(f"{self.stage}: step {s}/{self.total} ({100 * s / self.total:.0f}%), loss {m['loss']:.4f}{held_out}, "
            f"{m['tokens_per_s']:,.0f} tokens/s, {eta(self.total - s, rate)}")


def say(message: str) -> None:
    """A line for the user's console. Not `print`: Ray Train patches it in its workers and, with stderr
    wrapped, prints each line twice (to the stream and through its logger)."""
    sys.stderr.write(f"[scoder-ray] {message}\n")
    sys.stderr.flush()


def _get_rng() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def deepspeed_config(conf: dict[str, Any], world: int, betas: tuple[float, float], eps: float) -> dict[str, Any]:
    on_gpu = conf["gpus_per_worker"] > 0
    zero: dict[str, Any] = {"stage": conf["zero_stage"], "contiguous_gradients": True, "overlap_comm": on_gpu,
                            "stage3_gather_16bit_weights_on_model_save": True}
    if conf["cpu_offload"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if conf["zero_stage"] == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": conf["micro_batch_size"],
        "gradient_accumulation_steps": conf["grad_accum"],
        "train_batch_size": conf["micro_batch_size"] * conf["grad_accum"] * world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": conf["precision"] == "bf16"},
        "fp16": {"enabled": conf["precision"] == "fp16"},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if on_gpu:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": conf["lr"], "betas": list(betas), "eps": eps,
                                                        "weight_decay": conf["weight_decay"]}}
    return cfg


class ExportUploads:
    """Rank 0's export uploads, a thread each: the next steps do not need them, only the end of the stage.
    An upload that fails fails the training at the next step (`busy`), and the worker group restarts."""

    def __init__(self):
        self.threads: dict[str, threading.Thread] = {}  # export name -> its upload
        self.errors: list[str] = []
        self.timings: dict[str, dict[str, float]] = {}  # export name -> upload_s, steps_while_uploading

    def start(self, local: str, uri: str) -> None:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        self.timings[name] = {"upload_s": 0.0, "steps_while_uploading": 0}
        self.threads[name] = threading.Thread(target=self._upload, args=(local, uri, name), daemon=True)
        self.threads[name].start()

    def _upload(self, local: str, uri: str, name: str) -> None:
        started = time.perf_counter()
        try:
            _upload_dir(local, uri)
        except Exception as e:  # noqa: BLE001 - raised in the training loop
            self.errors.append(f"uploading {uri}: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
            self.timings[name]["upload_s"] = round(time.perf_counter() - started, 3)

    def busy(self) -> bool:
        if self.errors:
            raise RuntimeError(self.errors[0])
        return any(t.is_alive() for t in self.threads.values())

    def stepped(self) -> None:
        """A step ended: counted for each export still uploading."""
        for name, t in self.threads.items():
            if t.is_alive():
                self.timings[name]["steps_while_uploading"] += 1

    def join(self) -> None:
        for t in self.threads.values():
            t.join()
        self.busy()


def _export(engine, model, tokenizer, conf, config, uri: str, rank: int, betas, eps, lr,
            uploads: ExportUploads) -> None:
    """Write one checkpoint folder, uploaded in the background. Collective: every rank must call it (ZeRO
    gathers)."""
    import torch

    lora = conf["lora"]["enabled"]
    # The training model's logits on a probe sequence, kept with the export: loading the folder in
    # transformers or vLLM must reproduce them (tests check this; so can users).
    probe = torch.as_tensor([config["probe_ids"]], device=engine.device)
    engine.eval()
    with torch.no_grad():
        probe_logits = engine(input_ids=probe).logits[0].float().cpu()
    engine.train()
    if conf["zero_stage"] == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0, layer by layer
    else:
        state_dict = model.state_dict() if rank == 0 else None
    moments = _gather_moments(model) if lora else None
    if rank != 0:
        return
    d = tempfile.mkdtemp(prefix="scoder-export-")  # the upload's: deleted once uploaded
    state_dict = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    if getattr(model.config, "tie_word_embeddings", False) and not lora:
        state_dict.pop("lm_head.weight", None)  # ZeRO-3 gathers the tied copy too
    model.save_pretrained(d, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(d)
    from safetensors.torch import save_file

    os.makedirs(os.path.join(d, "export_check"))  # a subfolder: vLLM loads every top-level *.safetensors
    save_file({"input_ids": probe[0].cpu().contiguous(), "logits": probe_logits.contiguous()},
              os.path.join(d, "export_check", "probe.safetensors"))
    if lora:
        save_moments(os.path.join(d, "optimizer"), moments, optimizer_step=engine.global_steps, betas=betas, eps=eps, lr=lr)
        if conf["lora"]["export_merged"]:
            _save_merged(config["model_path"], d, os.path.join(d, "merged"), tokenizer)
    uploads.start(d, uri)


def _gather_moments(model) -> dict[str, dict[str, Any]]:
    """{adapter key: {"exp_avg", "exp_avg_sq"}} on rank 0 (None elsewhere). Collective."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    out: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        pair = {k: safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq")}
        if dist.get_rank() == 0:
            out[adapter_key(name)] = {k: v.detach().float().cpu().clone() for k, v in pair.items()}
    return out


def adapter_key(param_name: str, adapter_name: str = "default") -> str:
    """The key PEFT gives a trainable parameter in adapter_model.safetensors (adapter name removed)."""
    return param_name.replace(f".{adapter_name}.", ".")


def save_moments(folder: str, moments: dict[str, dict[str, Any]], optimizer_step: int, betas, eps: float, lr: float) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for kind in ("exp_avg", "exp_avg_sq"):
        save_file({k: v[kind].contiguous() for k, v in moments.items()}, os.path.join(folder, f"{kind}.safetensors"))
    with open(os.path.join(folder, "optimizer.json"), "w") as f:
        json.dump({"step": optimizer_step, "betas": list(betas), "eps": eps, "lr": lr, "format": MOMENTS_FORMAT}, f, indent=2)


def _save_merged(base_path: str, adapter_dir: str, out: str, tokenizer) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)


def _skip_shm_comm_op() -> None:
    """DeepSpeed builds a C++ shared-memory comm op at start-up (~60 s of JIT on CPU) that gloo never
    uses; replace the builder on the real `deepspeed.comm.torch` module (SETUP.md)."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _upload_dir(local: str, uri: str) -> None:
    import pyarrow.fs as pafs

    from scoder_ray.store import filesystem

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)  # a re-export after a restart replaces the earlier one
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
