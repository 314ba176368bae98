"""SFT data: rows -> (prompt, response) -> chat-templated token ids with response-only labels.

Formats (columns each needs):
- `synthesizer`: snippet, problem, solution — the synthesizer learns snippet -> problem + solution;
- `scoder`:      problem, solution          — the code model learns problem -> solution;
- either:        prompt, response           — already paired text, used as is.
Prompt tokens get label -100, so the loss covers the response (and its end-of-turn token) only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from scoder_ray import prompts

IGNORE = -100
FORMATS = {"synthesizer": ("snippet", "problem", "solution"), "scoder": ("problem", "solution")}


def check_columns(columns: Iterable[str], fmt: str, source: str) -> None:
    """Raise a clear error unless the rows carry what `fmt` needs."""
    columns = set(columns)
    if {"prompt", "response"} <= columns:
        return
    need = FORMATS[fmt]
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(f"{source}: rows lack column(s) {', '.join(missing)} for the {fmt} format "
                         f"(need {', '.join(need)}, or prompt and response); found {', '.join(sorted(columns))}")


def prompt_response(row: dict[str, Any], fmt: str, instruction: str = prompts.SYNTH_INSTRUCTION) -> tuple[str, str]:
    """`instruction`: the synthesizer's template (prompts.instruction(cfg.prompts.synthesizer))."""
    if "prompt" in row and "response" in row:
        return row["prompt"], row["response"]
    if fmt == "synthesizer":
        return (prompts.synthesizer_prompt(row["snippet"], row.get("lang"), instruction),
                prompts.synthesizer_response(row["problem"], row["solution"]))
    return prompts.scoder_prompt(row["problem"]), prompts.scoder_response(row["solution"])


def encode(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). The prompt goes through the chat template with the generation
    prompt; the response is followed by the end-of-turn token, which the model must learn to emit."""
    prompt_text = tokenizer.apply_chat_template(prompts.chat(prompt), tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, fmt: str, max_len: int, models=None,
                   seed: int = 0, instruction: str = prompts.SYNTH_INSTRUCTION) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: rows -> input_ids, labels, n_tokens, truncated, no_response, key (`row_key`).
    `model_path`: a model reference, resolved on the node the task runs on when `models` is given."""
    if models is not None:
        from scoder_ray.model_cache import local_model

        model_path = local_model(model_path, models)
    tokenizer = _tokenizer(model_path)
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "truncated": [], "no_response": [], "key": []}
    for i in range(n):
        prompt, response = prompt_response({k: batch[k][i] for k in keys}, fmt, instruction)
        ids, labels, truncated = encode(tokenizer, prompt, response, max_len)
        out["input_ids"].append(np.asarray(ids, dtype=np.int32))
        out["labels"].append(np.asarray(labels, dtype=np.int32))
        out["n_tokens"].append(len(ids))
        out["truncated"].append(truncated)
        out["no_response"].append(all(label == IGNORE for label in labels))
        out["key"].append(row_key(ids, labels, seed))
    return {k: np.array(v, dtype=object) if k in ("input_ids", "labels") else np.array(v) for k, v in out.items()}


def row_key(ids: list[int], labels: list[int], seed: int) -> int:
    """A seeded 63-bit hash of an example's tokens: which rows are held out for validation depends on their
    content and the run seed, not on the order Ray Data's blocks come in (identical rows fall on one side)."""
    import hashlib

    data = np.asarray(ids, dtype=np.int32).tobytes() + np.asarray(labels, dtype=np.int32).tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") >> 1


def validation_count(val_size: float, rows: int) -> int:
    """How many of `rows` a `val_size` holds out (LLaMA-Factory's meaning: < 1 a share, at least one row;
    >= 1 a count)."""
    if val_size <= 0:
        return 0
    return max(1, int(round(val_size * rows))) if val_size < 1 else int(val_size)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedy packing of whole examples into sequences of at most max_len tokens (order kept)."""
    packed, ids, labels = [], [], []
    for e_ids, e_labels in examples:
        if ids and len(ids) + len(e_ids) > max_len:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + list(e_ids), labels + list(e_labels)
    if ids:
        packed.append((ids, labels))
    return packed


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad a micro-batch: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def loss_tokens(labels: list[int]) -> int:
    """How many positions of an example the loss covers (its labels after the causal shift, padding and
    prompt excluded)."""
    return int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE))


@dataclass(frozen=True)
class Schedule:
    """Which examples every rank sees at every optimizer step, fixed by the seed: a resumed run sees
    exactly what an uninterrupted one would, and the step count is exact."""
    n_examples: int
    world: int
    micro: int
    accum: int
    epochs: int
    max_steps: int
    seed: int
    lengths: Any = field(default=None, compare=False, repr=False)  # tokens per example, for length grouping
    group_steps: int = 0  # sort by length within windows of this many steps (0: plain shuffle)
    _orders: dict = field(default_factory=dict, compare=False, repr=False)  # the current epoch's order

    @property
    def per_step(self) -> int:
        return self.world * self.micro * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.per_step

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def check(self, source: str) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{source}: {self.n_examples} training sequences are fewer than one optimizer step "
                             f"({self.world} workers x {self.micro} micro-batch x {self.accum} accumulation = {self.per_step})")

    def indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = ((in_epoch * self.accum + micro_step) * self.world + rank) * self.micro
        return order[start:start + self.micro]

    def step_examples(self, step: int) -> np.ndarray:
        """Every example of one optimizer step, on every rank and micro-step."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[in_epoch * self.per_step:(in_epoch + 1) * self.per_step]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The examples of one epoch in the order the steps take them: a seeded permutation; with `lengths`
        and `group_steps`, each window of `group_steps` optimizer steps is sorted by length, cut into steps
        and the steps shuffled, so a step's micro-batches (on every rank) hold similar lengths and pad little
        (HF Trainer's group_by_length megabatches, with the step, not the micro-batch, as the unit). A window
        is at most a quarter of the epoch: one holding the whole epoch would make the same batches every epoch
        (measured on tiny-loop: it then learned slower; windows of a quarter matched the plain loss curve)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n_examples)
            if self.lengths is not None and self.group_steps > 0:
                lengths = np.asarray(self.lengths)
                window = min(self.group_steps, max(1, self.steps_per_epoch // 4)) * self.per_step
                used = self.steps_per_epoch * self.per_step
                grouped = []
                for start in range(0, used, window):
                    chunk = order[start:min(start + window, used)]
                    by_step = chunk[np.argsort(-lengths[chunk], kind="stable")].reshape(-1, self.per_step)
                    grouped.append(by_step[rng.permutation(len(by_step))].reshape(-1))
                order = np.concatenate([*grouped, order[used:]])
            self._orders.clear()  # one epoch at a time: steps go forward
            self._orders[epoch] = order
        return self._orders[epoch]

    def checkpoint_steps(self, m: int, at: str) -> list[int]:
        """The (1-based) optimizer steps after which the M checkpoints are exported."""
        total = self.total_steps
        if at == "epochs" and not self.max_steps:
            ends = [(e + 1) * self.steps_per_epoch for e in range(self.epochs)]
            return ends[-m:]
        return sorted({max(1, math.ceil(total * (i + 1) / m)) for i in range(m)})


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Multiplier of the peak lr at each step: linear warm-up, then cosine/linear decay or constant."""
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def read_examples(uri: str, packing: bool, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenized rows (as the stage wrote them) -> examples, optionally packed."""
    import pyarrow.dataset as pads

    table = pads.dataset(uri, format="parquet").to_table(columns=["input_ids", "labels"])
    examples = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))
    return pack(examples, max_len) if packing else examples

