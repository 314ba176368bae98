"""GPU checks for a lent H100/H200 (no Ray, no downloads; DeepSpeed and its pydantic/hjson carried as wheels).

    PYTHONPATH=. python3 bench/gpu_check.py [--out DIR] [--shape 1b|7b]

`--shape 7b` (issues 19, 20): a randomly initialised 7B-shaped Llama (hidden 4096, 32 layers), built on the
GPU in bf16; training with ZeRO-3 (goal: MFU >= 40%), and the feature kernel with LoRA r=128 on q/k/v/o
(134M parameters) at 2048 tokens and the default sketched projection (influence.sketch_dim), printing
examples/s and the share of time in the projection (Adam transform, CountSketch, dense product). Results are written after each part, so a run cut short keeps what it measured.

1. Training step path (issue 4): a randomly initialised ~1.1B Llama, bf16, our `deepspeed_config` (ZeRO-2,
   GPU path: DeepSpeed's fused Adam, gradient checkpointing as the worker enables it), one rank over NCCL; then
   the worker's own collectives (`reduced`, `held_out_loss`) on that NCCL group (`worker_collectives`: NCCL has
   no CPU tensors, and the CPU suite's gloo cannot tell).
   Prints tokens/s and MFU (6 * params * tokens/s over the GPU's dense bf16 peak), `--grad-accum` micro-batches
   per optimizer step (4, as paper-7b's SCoder training), with the optimizer's step timed apart.
2. Influence feature kernel (issue 7): the same Llama with LoRA r=128 on q/k/v/o, per-example gradients
   (vmap), Adam transform and the d=8192 Rademacher projection generated on the GPU. Prints examples/s.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)


def llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def on_gpu(config):
    """A random model built directly on the GPU in bf16 (a 7B model built on the CPU takes minutes)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def train_check(micro: int, seq: int, steps: int, config=None, zero_stage: int = 2, grad_accum: int = 1) -> dict:
    """`steps` optimizer steps of `grad_accum` micro-batches each. The optimizer step (Adam over every parameter on
    one GPU: 16 B/param of traffic) is timed apart from the forward/backward micro-steps: on 8 GPUs under ZeRO-3
    each holds an eighth of it, so `mfu_6N_8gpu_est` charges one eighth (without the collectives' time)."""
    import deepspeed
    from transformers import LlamaForCausalLM

    from scoder_ray.train.data import lr_lambda
    from scoder_ray.train.worker import deepspeed_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_1b()).to(torch.bfloat16) if config is None else on_gpu(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable()
    conf = {"gpus_per_worker": 1, "zero_stage": zero_stage, "cpu_offload": False, "precision": "bf16", "micro_batch_size": micro,
            "grad_accum": grad_accum, "lr": 1e-4, "weight_decay": 0.0}
    ds_cfg = deepspeed_config(conf, 1, (0.9, 0.999), 1e-8)
    sched = lr_lambda(steps + 3, 0.0, "constant")
    t0 = time.perf_counter()
    optimizer_kind = "deepspeed FusedAdam"
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                               lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
                                               config=ds_cfg)
    except Exception as e:  # noqa: BLE001 - report and measure the step path with torch's fused AdamW instead
        optimizer_kind = f"torch fused AdamW (FusedAdam failed: {type(e).__name__}: {str(e)[:200]})"
        ds_cfg.pop("optimizer")
        # The failed engine left its forward hooks on the model: a fresh one for the second engine.
        del model
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_1b()).to(torch.bfloat16) if config is None else on_gpu(config)
        model.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                               optimizer=opt, config=ds_cfg)
    init_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (micro, seq), device="cuda")
    for _ in range(2 * grad_accum):  # warm-up: two optimizer steps
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    micro_s = opt_s = 0.0
    for _ in range(steps):
        for _ in range(grad_accum):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            torch.cuda.synchronize()
            micro_s += time.perf_counter() - t
            t = time.perf_counter()
            engine.step()  # the optimizer's step on the last micro-batch only
            torch.cuda.synchronize()
            opt_s += time.perf_counter() - t
    dt = micro_s + opt_s
    tokens = micro * seq * grad_accum * steps
    tps = tokens / dt
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    out = {"gpu": name, "params": n_params, "zero_stage": zero_stage, "micro_batch": micro, "grad_accum": grad_accum,
           "seq": seq, "steps": steps, "optimizer": optimizer_kind,
           "deepspeed_init_s": round(init_s, 1), "step_s": round(dt / steps, 3), "tokens_per_s": round(tps),
           "forward_backward_s": round(micro_s, 2), "optimizer_step_s": round(opt_s, 2),
           "mfu_6N": round(6 * n_params * tps / peak, 3),
           "mfu_6N_forward_backward_only": round(6 * n_params * tokens / micro_s / peak, 3),
           "mfu_6N_8gpu_est": round(6 * n_params * tokens / (micro_s + opt_s / 8) / peak, 3),
           "loss_last": round(loss.item(), 3),
           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    out["worker_collectives"] = worker_collectives(engine, ids)
    del engine, model
    torch.cuda.empty_cache()
    return out


def worker_collectives(engine, ids, device: str = "cuda") -> dict:
    """The training worker's own reductions (step totals, the held-out loss) on this NCCL group, which, like Ray
    Train's on GPUs, has no CPU tensors: they must pass here before a GPU cluster trusts them."""
    from scoder_ray.train.worker import held_out_loss, reduced

    try:
        rows = [(r.tolist(), r.tolist()) for r in ids.cpu()]
        t = time.perf_counter()
        loss = held_out_loss(engine, rows + rows[:1], ids.shape[0], 1, 0, 0, torch.device(device))
        return {"reduced": reduced([1.0, 2.0], torch.device(device)) == [1.0, 2.0],
                "max": reduced([3.0], torch.device(device), "max") == [3.0],
                "held_out_loss": round(loss, 4), "held_out_s": round(time.perf_counter() - t, 3)}
    except Exception as e:  # noqa: BLE001 - reported beside the training numbers, which stand
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def influence_check(batch: int, seq: int, batches: int, workdir: str, config=None) -> dict:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from scoder_ray.influence.features import GradientFeatures

    torch.backends.cuda.matmul.allow_tf32 = True
    base_dir, ckpt_dir = os.path.join(workdir, "base"), os.path.join(workdir, "lora")
    torch.manual_seed(0)
    config = config or llama_1b()
    base = on_gpu(config)
    t0 = time.perf_counter()
    base.save_pretrained(base_dir)
    save_s = time.perf_counter() - t0
    peft = get_peft_model(base, LoraConfig(r=128, lora_alpha=512, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft.save_pretrained(ckpt_dir)
    os.makedirs(os.path.join(ckpt_dir, "optimizer"))
    keys = {n.replace(".default.", "."): p for n, p in peft.named_parameters() if "lora_" in n}
    save_file({k: (torch.randn_like(p) * 1e-3).float().cpu() for k, p in keys.items()}, os.path.join(ckpt_dir, "optimizer", "exp_avg.safetensors"))
    save_file({k: (torch.rand_like(p) * 1e-6).float().cpu() for k, p in keys.items()}, os.path.join(ckpt_dir, "optimizer", "exp_avg_sq.safetensors"))
    with open(os.path.join(ckpt_dir, "optimizer", "optimizer.json"), "w") as f:
        json.dump({"step": 100, "betas": [0.9, 0.999], "eps": 1e-8, "lr": 2e-5}, f)
    del peft, base
    torch.cuda.empty_cache()
    sketch_dim = 131072  # influence.sketch_dim's default
    t0 = time.perf_counter()
    feats = GradientFeatures(base_dir, ckpt_dir, "ckpt_01", dim=8192, run_seed=0, block_rows=4096, device="cuda",
                             proj_dtype="auto", model_dtype="auto", sketch_dim=sketch_dim)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats.projector.prepare()  # the actor does this once at start-up
    prepare_s = time.perf_counter() - t0
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    feats.features(ids[:2], mask[:2], labels[:2], "candidate")  # warm-up
    torch.cuda.synchronize()
    grad_s = proj_s = 0.0
    for _ in range(batches):  # what `features` does, timed in its two parts
        t = time.perf_counter()
        g = feats.gradients(ids, mask, labels).detach()
        torch.cuda.synchronize()
        grad_s += time.perf_counter() - t
        t = time.perf_counter()
        f = feats.projector.project(feats.adam_direction(g)).cpu()
        proj_s += time.perf_counter() - t
    dt = grad_s + proj_s
    return {"lora_params": feats.total, "proj_dim": 8192, "sketch_dim": sketch_dim, "batch": batch, "seq": seq,
            "save_s": round(save_s, 1), "load_s": round(load_s, 1), "projection_prepare_s": round(prepare_s, 1),
            "examples_per_s": round(batch * batches / dt, 2), "batch_s": round(dt / batches, 3),
            "projection_share": round(proj_s / dt, 3), "gradient_examples_per_s": round(batch * batches / grad_s, 2),
            "feature_shape": list(f.shape), "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--shape", choices=["1b", "7b"], default="1b")
    ap.add_argument("--micro", type=int, default=0, help="training micro-batch (0: 8 for 1b, 2 for 7b)")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (paper-7b's scoder: 4)")
    args = ap.parse_args()
    result = {}

    def save(part: str, fn) -> None:
        try:
            result[part] = fn()
        except Exception as e:  # noqa: BLE001 - a failed part is reported; the next one still runs
            result[part] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        torch.cuda.empty_cache()
        print(json.dumps(result, indent=2), flush=True)
        with open(os.path.join(args.out, f"gpu_check_{args.shape}.json"), "w") as f:
            json.dump(result, f, indent=2)

    big = args.shape == "7b"
    # The feature kernel first: DeepSpeed's engine may keep GPU memory after training.
    save("influence", lambda: influence_check(batch=4, seq=2048, batches=3, workdir="/tmp/scoder-gpu", config=llama_7b())
         if big else influence_check(batch=16, seq=512, batches=2, workdir="/tmp/scoder-gpu"))
    if not args.skip_train:
        save("train", lambda: train_check(micro=args.micro or 2, seq=2048, steps=3, config=llama_7b(), zero_stage=3,
                                          grad_accum=args.grad_accum) if big
             else train_check(micro=args.micro or 8, seq=1024, steps=5, grad_accum=args.grad_accum))


if __name__ == "__main__":
    main()
