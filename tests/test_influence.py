"""Influence features on a real LoRA warm-up checkpoint of the tiny model (trained by the training stage)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from scoder_ray.config import ModelsConf, load_config
from scoder_ray.influence.features import GradientFeatures, MissingMomentsError, to_batch
from scoder_ray.influence.stage import (actor_memory_gib, compute_features, feature_pools, influence_scores, keep_top,
                                       peak_warning, read_features)
from scoder_ray.train.data import encode, prompt_response

pytestmark = pytest.mark.slow


def examples(ckpt, rows, max_len=512):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids, labels = [], []
    for r in rows:
        e_ids, e_labels, _ = encode(tok, *prompt_response(r, "synthesizer"), max_len)
        ids.append(e_ids)
        labels.append(e_labels)
    return to_batch(ids, labels, tok.pad_token_id)


@pytest.fixture(scope="module")
def rows(train_rows):
    return pq.read_table(train_rows).to_pylist()


@pytest.fixture(scope="module")
def feats(lora_run):
    base, ckpts = lora_run
    return GradientFeatures(base, ckpts[-1], "ckpt_02", dim=8192, run_seed=0)


def test_vectorised_gradients_equal_a_per_example_loop(feats, rows, lora_run):
    _, ckpts = lora_run
    # Different lengths in one batch, right-padded to the longest.
    batch = examples(ckpts[-1], [rows[i] for i in (2, 5, 9)], max_len=1024)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and all((batch["labels"][i] != -100).any() for i in range(3))
    assert feats.head_only_on_response  # the loop below runs the full model's logits
    vec = feats.gradients(batch["input_ids"], batch["attention_mask"], batch["labels"])
    model = feats.model
    named = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    for row, length in enumerate(lengths):
        model.zero_grad()
        for p in named.values():
            p.requires_grad_(True)
        out = model(input_ids=batch["input_ids"][row:row + 1, :length])
        logits, lab = out.logits[0, :-1], batch["labels"][row, 1:length]
        valid = lab != -100
        loss = torch.nn.functional.cross_entropy(logits[valid], lab[valid])
        grads = torch.autograd.grad(loss, [named[n] for n in feats.names])
        loop = torch.cat([g.reshape(-1) for g in grads])
        # Tolerance: fp32, relative 1e-4 of the largest entry (vmap and the loop sum in different orders).
        assert torch.allclose(vec[row], loop, atol=1e-4 * loop.abs().max().item(), rtol=0)


def test_length_sorted_features_keep_the_input_order(feats, lora_run, rows):
    base, ckpts = lora_run
    batch = examples(ckpts[-1], rows[:10])
    whole = feats.features(batch["input_ids"], batch["attention_mask"], batch["labels"], "candidate").astype(np.float32)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths != sorted(lengths)  # the sort changes the order, so the scatter back is exercised
    listed = [(batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()) for i, n in enumerate(lengths)]
    sorted_fp32 = feats.features_of(listed, "candidate", pad_id=0, batch_size=3, buffer_mb=1).astype(np.float32)
    assert np.allclose(sorted_fp32, whole, rtol=0, atol=2e-3 * np.abs(whole).max())
    bf16 = GradientFeatures(base, ckpts[-1], "ckpt_02", dim=8192, run_seed=0, proj_dtype="bfloat16")
    rounded = bf16.features_of(listed, "candidate", pad_id=0, batch_size=4).astype(np.float32)
    cos = (rounded * whole).sum(1) / np.linalg.norm(rounded, axis=1) / np.linalg.norm(whole, axis=1)
    assert cos.min() > 0.999  # bfloat16 products move a feature far less than the projection's own error


def test_bfloat16_weights_give_the_same_gradient_directions(feats, lora_run, rows):
    """GPU actors load the base model in bfloat16 (`influence.model_dtype: auto`); the gradients keep their
    direction, which is all cosine influence uses. The LoRA factors stay float32 (PEFT)."""
    base, ckpts = lora_run
    batch = examples(ckpts[-1], rows[:6])
    exact = feats.gradients(batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()
    half = GradientFeatures(base, ckpts[-1], "ckpt_02", dim=8192, run_seed=0, model_dtype="bfloat16")
    assert next(half.model.get_base_model().parameters()).dtype == torch.bfloat16
    rounded = half.gradients(batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()
    assert rounded.dtype == torch.float32 and rounded.shape == exact.shape
    cos = torch.nn.functional.cosine_similarity(rounded, exact)
    print(f"cos(bf16-weight gradient, fp32-weight gradient): min {cos.min():.4f}")
    assert cos.min().item() > 0.98


def test_adam_transform_matches_the_saved_moments(feats, lora_run, rows):
    _, ckpts = lora_run
    opt = Path(ckpts[-1]) / "optimizer"
    m, v = load_file(opt / "exp_avg.safetensors"), load_file(opt / "exp_avg_sq.safetensors")
    meta = json.loads((opt / "optimizer.json").read_text())
    (b1, b2), eps = meta["betas"], meta["eps"]
    g = torch.randn(2, feats.total)
    direct = []
    for row in g:
        parts, at = [], 0
        for name in sorted(m):
            n = m[name].numel()
            gi = row[at:at + n].reshape(m[name].shape)
            parts.append(((b1 * m[name] + (1 - b1) * gi) / torch.sqrt(b2 * v[name] + (1 - b2) * gi ** 2 + eps)).reshape(-1))
            at += n
        direct.append(torch.cat(parts))
    assert torch.allclose(feats.adam_direction(g), torch.stack(direct), rtol=1e-6, atol=1e-7)


def test_projection_is_shared_and_preserves_cosine_ranking(feats, lora_run, rows):
    base, ckpts = lora_run
    other = GradientFeatures(base, ckpts[-1], "ckpt_02", dim=8192, run_seed=0, block_rows=1000)
    assert torch.equal(feats.projector.matrix(), other.projector.matrix())  # another actor, other block size
    assert not torch.equal(feats.projector.matrix()[:100], GradientFeatures(
        base, ckpts[-1], "ckpt_01", dim=8192, run_seed=0).projector.matrix()[:100])  # per-checkpoint matrices
    batch = examples(ckpts[-1], rows[:24])
    g = feats.gradients(batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()
    p = feats.projector.project(g)
    exact, projected = [], []
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            exact.append(torch.nn.functional.cosine_similarity(g[i], g[j], dim=0).item())
            projected.append(torch.nn.functional.cosine_similarity(p[i], p[j], dim=0).item())
    rho = spearmanr(exact, projected).statistic
    print(f"Spearman(exact cos, projected cos) at d=8192 over {len(exact)} pairs: {rho:.4f}")
    assert rho > 0.95


def test_sketched_projection_keeps_the_exact_influence_ranking(feats, lora_run, rows):
    """The CountSketch + dense map (what adapters above influence.sketch_dim get) against the exact,
    unprojected cosine, on real candidates (Adam directions) and references (gradients) of both warm-up
    checkpoints, summed as the stage sums them. Forced here on the tiny adapter (P ~ 16K) by a small m."""
    from scoder_ray.influence.features import Projector

    base, ckpts = lora_run
    exact, sketched, dense = {}, {}, {}
    for name, ckpt in (("ckpt_01", ckpts[0]), ("ckpt_02", ckpts[-1])):
        f = GradientFeatures(base, ckpt, name, dim=4096, run_seed=0)
        sketch = Projector(f.total, 4096, 0, name, 4096, sketch_dim=8192)
        assert 0 < sketch.sketch_dim < f.total
        cb, rb = examples(ckpt, rows[:40]), examples(ckpt, rows[40:56])
        c = f.adam_direction(f.gradients(cb["input_ids"], cb["attention_mask"], cb["labels"]).detach())
        r = f.gradients(rb["input_ids"], rb["attention_mask"], rb["labels"]).detach()
        exact[name], sketched[name], dense[name] = (c.numpy(), r.numpy()), \
            (sketch.project(c).numpy(), sketch.project(r).numpy()), (f.projector.project(c).numpy(), f.projector.project(r).numpy())

    def final(pairs):
        return influence_scores({k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()},
                                {k: 1.0 for k in pairs})

    rho_sketch = spearmanr(final(sketched), final(exact)).statistic
    rho_dense = spearmanr(final(dense), final(exact)).statistic
    print(f"Spearman vs exact at d=4096, 40 candidates x 16 references x 2 checkpoints: sketch (m=8192) "
          f"{rho_sketch:.4f}, dense {rho_dense:.4f}")
    # m is half of P here (0.942 vs 0.975 measured); at the bench's sizes (P 14.7M, m 131072, d 8192) the
    # two tie: 0.9954 vs 0.9956 (bench/influence.py --case smollm2-r128).
    assert rho_sketch > 0.92 and rho_sketch > rho_dense - 0.05


def test_sharding_over_one_or_two_actors_gives_identical_scores(ray_local, lora_run, rows, tmp_path):
    base, ckpts = lora_run
    data = tmp_path / "cands"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "cand_id": f"c{i:02d}"} for i, r in enumerate(rows[:12])]),
                   data / "part-0.parquet")
    # 3 actor calls of 4 rows: 1 actor runs all three, 2 actors share them.
    conf = load_config("tiny", ["influence.proj_dim=512", "influence.batch_size=4", "influence.max_len=512",
                                "influence.sort_window=4"]).influence
    results = []
    for actors in (1, 2):
        # The two actors each reserve memory (influence.memory_gib): Ray still places both.
        c = conf.__class__(**{**conf.__dict__, "num_actors": actors, "memory_gib": 0.0 if actors == 1 else 1.0})
        out = tmp_path / f"f{actors}"
        done = compute_features(str(data), str(out), base, ckpts[-1], "ckpt_02", "candidate", c, seed=0, models=ModelsConf())
        assert done["rows"] == 12 and done["actor_start_s"] > 0 and done["actor_busy_s"] > 0  # start-up, work apart
        assert 0.2 < done["actor_peak_gib"] < 8  # torch and the model, measured in the actor
        ids, f = read_features(str(out))
        order = np.argsort(ids)
        results.append(([ids[i] for i in order], f[order]))
    assert results[0][0] == results[1][0] and np.array_equal(results[0][1], results[1][1])
    # A shard killed while writing (one block's file cut off): the rest is kept, that block computed again.
    cut = sorted((tmp_path / "f2").glob("*.parquet"))[-1]
    lost = pq.read_table(cut).num_rows
    cut.write_bytes(cut.read_bytes()[:100])
    again = compute_features(str(data), str(tmp_path / "f2"), base, ckpts[-1], "ckpt_02", "candidate", c, seed=0,
                             models=ModelsConf())
    assert 0 < lost < 12 and again["rows"] == 12 and again["resumed_rows"] == 12 - lost
    ids, f = read_features(str(tmp_path / "f2"))
    order = np.argsort(ids)
    assert [ids[i] for i in order] == results[0][0] and np.array_equal(f[order], results[0][1])
    refs = {"ckpt_02": results[0][1][:3]}
    s1 = influence_scores({"ckpt_02": results[0][1]}, refs, {"ckpt_02": 1e-3})
    s2 = influence_scores({"ckpt_02": results[1][1]}, refs, {"ckpt_02": 1e-3})
    assert np.array_equal(s1, s2)
    rank, kept = keep_top(results[0][0], s1, c.__class__(**{**c.__dict__, "keep_count": 3}))
    assert kept.sum() == 3 and sorted(rank.tolist()) == list(range(1, 13))
    # The actors encode the rows with the configured instruction (prompts.synthesizer): another, other gradients.
    from scoder_ray.prompts import SYNTH_INSTRUCTION_EXAMPLES

    compute_features(str(data), str(tmp_path / "f3"), base, ckpts[-1], "ckpt_02", "candidate", c, seed=0,
                     models=ModelsConf(), instruction=SYNTH_INSTRUCTION_EXAMPLES)
    ids, f = read_features(str(tmp_path / "f3"))
    order = np.argsort(ids)
    assert [ids[i] for i in order] == results[0][0] and not np.allclose(f[order], results[0][1])


def test_feature_actors_past_their_memory_reservation_are_named():
    assert peak_warning(6.0, 7.0) == "" and peak_warning(9.0, 0.0) == ""  # within it; nothing reserved
    warning = peak_warning(7.6, 7.0)
    assert "reached 7.6 GiB" in warning and "7 GiB influence.memory_gib reserves" in warning
    assert warning.endswith("set influence.memory_gib=8.4")


def test_cpu_feature_pools_are_packed_by_memory_too(ray_local):
    memory_gib = ray_local.cluster_resources()["memory"] / 2**30
    cfg = load_config("tiny", [])  # 1 actor of 1 CPU a pool: two pools side by side on 2 CPUs
    assert feature_pools(cfg, 4) == [1, 1] and actor_memory_gib(cfg) == (0.0, "")
    cfg = load_config("tiny", [f"influence.memory_gib={memory_gib * 0.6:.2f}"])  # one pool's worth of memory
    assert feature_pools(cfg, 4) == [1] and actor_memory_gib(cfg) == (round(memory_gib * 0.6, 2), "")
    # More than any node has: lowered to what the node has (else the pool would wait forever), with a warning.
    cfg = load_config("tiny", [f"influence.memory_gib={memory_gib + 1:.2f}"])
    got, warning = actor_memory_gib(cfg)
    assert got == pytest.approx(memory_gib) and feature_pools(cfg, 4) == [1]
    assert "influence.memory_gib=" in warning and "more than any node has" in warning


def test_bad_input_is_named(lora_run, tmp_path):
    base, ckpts = lora_run
    bare = tmp_path / "no-moments"
    shutil.copytree(ckpts[-1], bare)
    shutil.rmtree(bare / "optimizer")
    with pytest.raises(MissingMomentsError, match="no Adam moments"):
        GradientFeatures(base, str(bare), "x", dim=64, run_seed=0)
    with pytest.raises(ValueError, match="the reference set \\(teacher samples\\) is empty"):
        influence_scores({"k": np.ones((3, 8))}, {"k": np.zeros((0, 8))}, {"k": 1.0})


def test_influence_aggregates_mean_and_max():
    c = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = np.array([[1.0, 0.0], [1.0, 1.0]])
    mean = influence_scores({"a": c}, {"a": r}, {"a": 2.0}, "mean")
    mx = influence_scores({"a": c}, {"a": r}, {"a": 2.0}, "max")
    assert np.allclose(mean, 2.0 * np.array([(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2]))
    assert np.allclose(mx, 2.0 * np.array([1.0, 2 ** -0.5]))


def test_warmup_and_influence_stages_through_the_run_store(ray_local, tmp_path, tiny_model_dir, train_rows, rows):
    """rank -> warmup (LoRA with moments) -> per-shard features -> influence, on real components."""
    from scoder_ray.influence.stage import run_influence, run_warmup
    from scoder_ray.score.stage import run_rank, run_score
    from scoder_ray.store import RunStore

    cfg = load_config("tiny", [f"run.root={tmp_path}", f"models.scorer={tiny_model_dir}", f"teacher.samples_file={train_rows}",
                               "train.warmup.epochs=2", "train.warmup.num_checkpoints=2", "train.warmup.micro_batch_size=2",
                               "influence.proj_dim=1024", "influence.warmup_fraction=0.5", "influence.keep_fraction=0.25",
                               "influence.max_len=512", "score.exec_timeout_s=3",
                               "influence.memory_gib=1000",  # more than the node has: lowered, with a warning
                               "quality.reference_near_dup_threshold=1.0"])  # the candidates here ARE teacher rows
    store = RunStore.for_config(cfg)
    from scoder_ray.generate.bootstrap import run_bootstrap

    run_bootstrap(cfg, store)
    cands = [{"cand_id": f"c{i:02d}", "seed_id": f"s{i % 6}", "iteration": 1, "ckpt": "ckpt_01", "sample_idx": i // 6,
              "snippet": r["snippet"], "problem": r["problem"], "solution": r["solution"], "raw": "", "parse_ok": True,
              "reason": "", "tokens": 1, "truncated": False} for i, r in enumerate(rows[:12])]

    def write(tmp):
        Path(tmp, "data").mkdir()
        pq.write_table(pa.Table.from_pylist(cands), f"{tmp}/data/part-0.parquet")
        return {"rows": len(cands)}

    store.run_stage("iter_01/sample", {}, {}, write)
    run_score(cfg, store, 1)
    ranked = run_rank(cfg, store, 1)
    warm = run_warmup(cfg, store, 1, tiny_model_dir)
    assert len(warm["checkpoints"]) == 2 and warm["candidate_rows"] == ranked["rows"] and warm["teacher_rows"] == 0
    # The reference set (the teacher samples) is held out of the warm-up: not among its inputs, not in its data.
    assert set(store.read_done("iter_01/warmup")["inputs"]) == {"iter_01/rank", "base"}
    mix = pq.read_table(Path(store.path("iter_01/warmup")) / "mix").to_pylist()
    selected = pq.read_table(Path(store.path("iter_01/rank")) / "data").to_pandas().query("selected")["cand_id"]
    assert sorted(r["cand_id"] for r in mix) == sorted(selected)
    done = run_influence(cfg, store, 1, tiny_model_dir)
    out = pq.read_table(Path(store.path("iter_01/influence")) / "data").to_pylist()
    assert done["candidates"] == ranked["rows"] == len(out) and done["rows"] == max(1, round(0.25 * len(out)))
    assert sorted(r["rank"] for r in out) == list(range(1, len(out) + 1))
    assert all(r["kept"] == (r["rank"] <= done["rows"]) for r in out)
    assert {r["cand_id"] for r in out} <= {c["cand_id"] for c in cands}
    assert set(done["checkpoint_lrs"]) == {"ckpt_01", "ckpt_02"}
    assert [w for w in done["warnings"] if w.startswith("influence.memory_gib=1000 is more than any node has")]
    shards = [s.name for s in store.stages() if "/features/" in s.name]
    assert len(shards) == 5 and all(s.state == "done" for s in store.stages())  # candidates + 2 ckpts x 2 kinds
    # no hidden time: the stage's seconds include its feature sub-stages, listed per checkpoint and kind
    assert set(done["feature_seconds"]) == {f"ckpt_0{i}-{k}" for i in (1, 2) for k in ("candidate", "reference")}
    # (the sub-stages may run side by side: the stage's seconds cover the span of their pools, not their sum)
    span = max(w[1] for w in done["pools"].values()) - min(w[0] for w in done["pools"].values())
    assert done["seconds"] >= span >= max(done["feature_seconds"].values()) > 0
    assert run_influence(cfg, store, 1, tiny_model_dir)["skipped"]
