"""The training schedule: which examples each rank sees at each step (fast tier: numpy only)."""
import numpy as np

from scoder_ray.train.data import Schedule


def padding(sched: Schedule, lengths: list[int]) -> float:
    """Share of the computed positions that are padding, over every micro-batch of the run."""
    computed = real = 0
    for step in range(sched.total_steps):
        for micro in range(sched.accum):
            for rank in range(sched.world):
                batch = [lengths[i] for i in sched.indices(step, micro, rank)]
                computed, real = computed + max(batch) * len(batch), real + sum(batch)
    return 1 - real / computed


def test_length_grouping_pads_less_and_keeps_every_epoch_whole():
    lengths = list(np.random.default_rng(0).integers(20, 500, size=203))
    plain = Schedule(203, 2, 4, 2, 3, 0, seed=7)
    grouped = Schedule(203, 2, 4, 2, 3, 0, seed=7, lengths=lengths, group_steps=4)
    assert grouped.total_steps == plain.total_steps == 3 * (203 // 16)
    for epoch in range(3):  # each epoch: every example at most once, as many as the plain shuffle uses
        seen = [i for step in range(epoch * grouped.steps_per_epoch, (epoch + 1) * grouped.steps_per_epoch)
                for micro in range(2) for rank in range(2) for i in grouped.indices(step, micro, rank)]
        assert len(seen) == len(set(seen)) == grouped.steps_per_epoch * 16
    assert padding(grouped, lengths) < 0.1 < 0.3 < padding(plain, lengths)
    # Deterministic by seed (a resumed run takes the same steps), and the windows' steps are shuffled:
    # the longest step does not always come first.
    again = Schedule(203, 2, 4, 2, 3, 0, seed=7, lengths=lengths, group_steps=4)
    assert all((again.indices(s, 1, 1) == grouped.indices(s, 1, 1)).all() for s in range(grouped.total_steps))
    step_max = [max(lengths[i] for m in range(2) for r in range(2) for i in grouped.indices(s, m, r))
                for s in range(grouped.total_steps)]
    windows = [step_max[w:w + 4] for w in range(0, grouped.total_steps, 4)]
    assert any(win != sorted(win, reverse=True) for win in windows)


def test_without_lengths_the_order_is_the_seeded_permutation():
    sched = Schedule(64, 2, 4, 1, 2, 0, seed=3, lengths=[5] * 64, group_steps=0)
    order = np.random.default_rng([3, 1]).permutation(64)
    assert (sched.indices(8 + 2, 0, 1) == order[(2 * 2 + 1) * 4:(2 * 2 + 2) * 4]).all()


def test_micro_batch_losses_add_up_to_the_steps_token_mean():
    """What the worker does with the pinned transformers: each micro-batch's loss divided by the step's token
    count (num_items_in_batch), averaged as DeepSpeed averages them, is the mean over every token of the step,
    however the examples are grouped into micro-batches."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scoder_ray.train.data import IGNORE, collate, loss_tokens

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    rng = np.random.default_rng(0)
    examples = []
    for n in (5, 6, 30, 40):  # two short, two long: grouped into a short and a long micro-batch
        ids = rng.integers(1, 64, size=n).tolist()
        examples.append((ids, [IGNORE] * 2 + ids[2:]))
    sched = Schedule(4, 1, 2, 2, 1, 0, seed=0, lengths=[len(i) for i, _ in examples], group_steps=1)
    covered = [loss_tokens(labels) for _, labels in examples]
    per_micro = sum(covered[i] for i in sched.step_examples(0)) / 2
    with torch.no_grad():
        losses = [model(**collate([examples[i] for i in sched.indices(0, m, 0)], 0), num_items_in_batch=per_micro).loss
                  for m in range(2)]
        everything = collate(examples, 0)
        token_mean = model(**everything).loss  # one batch of all four: the mean over every covered token
        batch_means = [model(**collate([examples[i] for i in sched.indices(0, m, 0)], 0)).loss for m in range(2)]
    assert sorted(len(examples[i][0]) for i in sched.indices(0, 0, 0)) in ([5, 6], [30, 40])  # grouped by length
    assert torch.allclose(sum(losses) / 2, token_mean, atol=1e-5)
    assert not torch.allclose(sum(batch_means) / 2, token_mean, atol=1e-3)  # what a per-batch mean would give


def test_a_retrain_starts_from_the_base_model_or_the_synthesizer_that_sampled(tmp_path):
    from scoder_ray.config import load_config
    from scoder_ray.store import RunStore
    from scoder_ray.train.stage import retrain_start

    def trained(tmp: str) -> dict:
        return {"rows": 4, "checkpoints": [{"name": "ckpt_01"}, {"name": "ckpt_02"}]}

    base = load_config("tiny", [f"run.root={tmp_path}", "run.id=r"])
    store = RunStore.for_config(base)
    store.run_stage("train_synthesizer", {}, {}, trained)
    assert retrain_start(base, store, 1) == ("builtin:tiny", "")
    previous = load_config("tiny", [f"run.root={tmp_path}", "run.id=r", "loop.retrain_from=previous"])
    first = store.read_done("train_synthesizer")["output_digest"]
    assert retrain_start(previous, store, 1) == (f"{store.uri('train_synthesizer')}/ckpt_02", first)
    store.run_stage("iter_01/train", {}, {}, trained)  # iteration 2 builds on iteration 1's retrain
    assert retrain_start(previous, store, 2) == (f"{store.uri('iter_01/train')}/ckpt_02",
                                                 store.read_done("iter_01/train")["output_digest"])
    assert retrain_start(base, store, 2) == ("builtin:tiny", "")


def test_a_window_is_at_most_a_quarter_of_the_epoch_so_batches_change_between_epochs():
    lengths = list(np.random.default_rng(1).integers(20, 500, size=64))
    sched = Schedule(64, 2, 4, 1, 2, 0, seed=0, lengths=lengths, group_steps=64)  # 8 steps an epoch: windows of 2

    def batches(epoch: int) -> set[frozenset]:
        return {frozenset(sched.indices(epoch * 8 + s, 0, r).tolist()) for s in range(8) for r in range(2)}

    assert batches(0) != batches(1)
    assert padding(sched, lengths) < padding(Schedule(64, 2, 4, 1, 2, 0, seed=0), lengths)


def test_held_out_rows_are_chosen_by_content_and_seed_as_llamafactory_counts_them():
    import pytest

    from scoder_ray.config import ConfigError, load_config
    from scoder_ray.train.data import row_key, validation_count

    # val_size: < 1 a share (at least one row), >= 1 a count; 0 none
    assert [validation_count(v, 200) for v in (0, 0.05, 0.001, 7, 7.0)] == [0, 10, 1, 7, 7]
    rows = [([1, 2, i, i % 5], [-100, 2, i, i % 5]) for i in range(50)]
    keys = [row_key(ids, labels, seed=3) for ids, labels in rows]
    assert keys == [row_key(ids, labels, 3) for ids, labels in rows] and len(set(keys)) == 50
    assert all(0 <= k < 2**63 for k in keys)  # fits Parquet's int64

    def held(rs: list, seed: int = 3) -> set:  # the stage's rule: the 5 smallest keys
        ks = [row_key(ids, labels, seed) for ids, labels in rs]
        return {tuple(rs[i][0]) for i in range(len(rs)) if ks[i] <= sorted(ks)[4]}

    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(50)]  # Ray Data's blocks in another order
    assert held(rows) == held(shuffled) and len(held(rows)) == 5
    assert held(rows, seed=4) != held(rows)  # another run seed holds out other rows
    assert row_key([1, 2], [-100, 2], 3) != row_key([1, 2], [1, 2], 3)  # the labels are part of the row
    for bad in ("-1", "2.5"):
        with pytest.raises(ConfigError, match=r"train.scoder.val_size: .* a share of the rows in \[0, 1\) or a whole"):
            load_config("tiny", [f"train.scoder.val_size={bad}"])
    with pytest.raises(ConfigError, match="train.synthesizer.eval_steps"):
        load_config("tiny", ["train.synthesizer.eval_steps=-3"])


def test_a_held_out_loss_that_rises_is_a_warning_in_words():
    from scoder_ray.train.stage import overfit_warning

    assert overfit_warning([(5, 1.2), (10, 0.9), (15, 0.905)], rows=100) == ""  # within 2% of the lowest
    warning = overfit_warning([(5, 1.2), (10, 0.9), (15, 1.1)], rows=100)
    assert "rose from 0.9000 at step 10 to 1.1000 at the last step 15 (+22%)" in warning
    assert "overfits its 100 training rows" in warning
    assert overfit_warning([(4, 2.0)], rows=10) == ""
    assert "exported checkpoints" not in warning  # none named: no better one to point to
    ckpts = [{"name": "ckpt_01", "step": 10, "eval_loss": 0.9}, {"name": "ckpt_02", "step": 15, "eval_loss": 1.1}]
    assert overfit_warning([(5, 1.2), (10, 0.9), (15, 1.1)], 100, ckpts).endswith(
        "; of the exported checkpoints ckpt_01 (step 10) has the lowest, 0.9000")
    assert "exported checkpoints" not in overfit_warning([(5, 0.9), (10, 1.1)], 100, ckpts[1:])  # the last is the only one
