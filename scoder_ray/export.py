"""`scoder-ray export`: a run's final dataset in the layouts fine-tuning tools read, and its SCoder model.

Dataset formats (one JSONL record per sample, the answer fenced as the SCoder model learns it):
  messages  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   (TRL, OpenRLHF, axolotl)
  alpaca    {"instruction", "input": "", "output"}                              (LLaMA-Factory, alpaca)
  sharegpt  {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}   (LLaMA-Factory, FastChat)
  parquet   problem, solution, seed_id, cand_id                                 (raw columns)
The folder holds `data/train.*` and a README.md dataset card whose YAML header tells `datasets` where the
data is, so `datasets.load_dataset(FOLDER)` reads it; for the JSONL layouts also a `dataset_info.json`, so
LLaMA-Factory trains on it with `dataset_dir: FOLDER` and `dataset: <run id>`; `--to hub:ORG/NAME` uploads
it (HF_TOKEN).
The model export copies a train_scoder checkpoint (full weights; the last, the one with the lowest held-out loss,
or one named) and writes a model card.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from scoder_ray import prompts
from scoder_ray.prompts import INSTRUCTIONS
from scoder_ray.store import RunStore, filesystem

FORMATS = ("messages", "alpaca", "sharegpt", "parquet")
# LLaMA-Factory's entry for each JSONL layout (its data/README.md: `dataset_info.json` in `dataset_dir`,
# `file_name` relative to it); `messages` is its sharegpt formatting with OpenAI's role/content tags.
LLAMAFACTORY = {
    "alpaca": {"columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "sharegpt": {"formatting": "sharegpt", "columns": {"messages": "conversations"}},
    "messages": {"formatting": "sharegpt", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
}


def record(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    question, answer = prompts.scoder_prompt(row["problem"]), prompts.scoder_response(row["solution"])
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if fmt == "alpaca":
        return {"instruction": question, "input": "", "output": answer}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def export_dataset(store: RunStore, out_dir: str, fmt: str = "messages") -> Path:
    """Write the final dataset of `store`'s run to `out_dir` (replaced whole, atomically) and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    final = store.read_done("final")
    if final is None:
        raise ValueError(f"{store.base}: no final dataset yet (the `final` stage has not finished); run the loop to the end")
    fs, path = filesystem(store.uri("final") + "/data")
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    out = Path(out_dir).expanduser()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    if fmt == "parquet":
        data_file = "data/train.parquet"
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("problem", "solution", "seed_id", "cand_id")}
                                             for r in rows]), tmp / data_file)
    else:
        data_file = "data/train.jsonl"
        text = "".join(json.dumps(record(r, fmt), ensure_ascii=False) + "\n" for r in rows)
        (tmp / data_file).write_text(text)
        entry = {"file_name": data_file, "file_sha1": hashlib.sha1(text.encode()).hexdigest(), **LLAMAFACTORY[fmt]}
        (tmp / "dataset_info.json").write_text(json.dumps({llamafactory_name(store): entry}, indent=2) + "\n")
    (tmp / "README.md").write_text(dataset_card(store, final, fmt, data_file, len(rows)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def llamafactory_name(store: RunStore) -> str:
    """The dataset's name in dataset_info.json (LLaMA-Factory's `dataset:`): the run id, as a plain word."""
    return re.sub(r"[^\w.-]", "_", store.run_id)


def dataset_card(store: RunStore, final: dict[str, Any], fmt: str, data_file: str, n: int) -> str:
    cfg = store.read_config()
    boot, seeds = store.read_done("bootstrap") or {}, store.read_done("seeds") or {}
    teacher = (f"samples file `{cfg.teacher.samples_file}`" if cfg and cfg.teacher.samples_file
               else f"`{cfg.teacher.model}` at {cfg.teacher.base_url}" if cfg else "?")
    q = cfg.quality if cfg else None
    gates = (f"placeholders, prompt echoes, prose-less problems (< {q.min_problem_words} words), seed copies "
             f"(similarity >= {q.max_seed_similarity}), undefined entry points, "
             f"{'solutions reading names they never define or import, ' if q.reject_undefined_names else ''}"
             "degenerate samples (stubs, infinite recursion, repeated lines), contamination "
             f"({q.decontam_ngram}-gram overlap >= {q.decontam_threshold} with {', '.join(q.decontam_benchmarks)}), "
             f"exact, same-code and near duplicates (MinHash Jaccard >= {q.near_dup_threshold}), examples stated in the problem "
             "that fail in the sandbox") if q else "?"
    header = "\n".join(["---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
                        f"    path: {data_file}", "task_categories:", "- text-generation", "language:", "- en",
                        "tags:", "- code", "- synthetic", "- scoder-ray", "size_categories:",
                        f"- {'n<1K' if n < 1000 else '1K<n<10K' if n < 10000 else '10K<n<100K' if n < 100000 else 'n>100K'}",
                        "---", ""])
    facts = {
        "samples": n, "format": fmt, "dataset digest": final.get("dataset_digest", ""),
        "run": f"{store.run_id} ({final.get('finished_at', '')})",
        "seed sources": ", ".join(seeds.get("sources", [])) + f" ({seeds.get('rows', '?')} snippets)",
        "teacher": f"{teacher}: {boot.get('rows', '?')} samples"
                   + (f" (run in the sandbox: {ex['passed']} of {ex['ran']} passed)" if (ex := boot.get("execution", {})).get("ran")
                      else ""),
        "instruction": f"`prompts.synthesizer: {cfg.prompts.synthesizer}`" if cfg and cfg.prompts.synthesizer in INSTRUCTIONS
                       else "a template of the run's own (its config.yaml, `prompts.synthesizer`)" if cfg else "?",
        "synthesizer": f"{cfg.models.synthesizer if cfg else '?'} after {cfg.loop.iterations if cfg else '?'} "
                       "self-distillation iteration(s)",
        "generated / kept": f"{final.get('generated', '?')} / {n}, from {final.get('seeds', '?')} seeds "
                            f"({final.get('seeds_yielding', '?')} yielded a sample)",
        "rejected, by reason": json.dumps(final.get("rejected", {})),
        "decontamination": json.dumps(final.get("decontam", {})),
        "audit of the kept rows": json.dumps(final.get("audit", {})),
    }
    lines = [f"# {store.run_id}: synthetic code instructions (scoder-ray)", "",
             "Problems and Python solutions written by a small synthesizer model trained by iterative "
             "self-distillation (the SCoder method), exported by `scoder-ray export`.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts.items()), "",
             f"Filters: {gates}.", "",
             *(["Warnings of the final stage: " + "; ".join(final["warnings"]), ""] if final.get("warnings") else []),
             f"Exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."]
    return header + "\n".join(lines) + "\n"


def scoder_checkpoint(store: RunStore, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train_scoder's _DONE, the checkpoint `checkpoint` names there), or a ValueError that says why not."""
    trained = store.read_done("train_scoder")
    if trained is None:
        raise ValueError(f"{store.base}: no SCoder model yet (train_scoder has not finished)")
    ckpts = trained["checkpoints"]
    if checkpoint == "best":
        scored = [c for c in ckpts if c.get("eval_loss") is not None]
        if not scored:
            raise ValueError("--checkpoint best: this run's SCoder training had no held-out loss "
                             "(train.scoder.val_size was 0)")
        return trained, min(scored, key=lambda c: c["eval_loss"])
    chosen = ckpts[-1] if checkpoint == "last" else next((c for c in ckpts if c["name"] == checkpoint), None)
    if chosen is None:
        raise ValueError(f"--checkpoint {checkpoint!r}: expected last, best or one of {', '.join(c['name'] for c in ckpts)}")
    return trained, chosen


def export_model(store: RunStore, out_dir: str, checkpoint: str = "last") -> Path:
    """Copy a train_scoder checkpoint (full weights, tokenizer) to `out_dir` with a model card: `last` (the one
    `evaluate` measured), `best` (the lowest held-out loss, train.scoder.val_size) or a name (ckpt_01...)."""
    from scoder_ray.model_cache import local_model

    trained, chosen = scoder_checkpoint(store, checkpoint)
    cfg = store.read_config()
    ckpts = trained["checkpoints"]
    name = chosen["name"]
    src = Path(local_model(f"{store.uri('train_scoder')}/{name}", cfg.models))
    out = Path(out_dir).expanduser()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    final = store.read_done("final") or {}
    results = (store.read_done("evaluate") or {}).get("results", {})
    t = cfg.train.scoder
    epochs = "" if t.max_steps else f"{t.epochs} epoch{'s' * (t.epochs != 1)}, "
    training = (f"Training: {trained.get('rows', '?')} rows, {epochs}{trained.get('total_steps', '?')} optimizer "
                f"steps, lr {t.lr:g} ({t.lr_schedule}), {'LoRA' if t.lora.enabled else 'full fine-tuning'}, DeepSpeed "
                f"ZeRO-{t.zero_stage}, {t.precision}, max {t.max_len} tokens.")
    if trained.get("eval_loss") is not None:
        best = trained.get("best_eval") or {}
        training += (f" Held-out loss on {trained.get('val_rows', '?')} rows never trained on: {trained['eval_loss']:.4f} "
                     f"at the last step (lowest {best.get('loss', trained['eval_loss']):.4f}, step {best.get('step', '?')})"
                     + (f"; {chosen['eval_loss']:.4f} at this checkpoint's step {chosen['step']}."
                        if chosen is not ckpts[-1] and chosen.get("eval_loss") is not None else "."))
    measured = "" if chosen is ckpts[-1] else f" of the last checkpoint, {ckpts[-1]['name']}, not this one"
    (tmp / "README.md").write_text("\n".join([
        "---", f"base_model: {cfg.models.scoder.removeprefix('hf:')}", "tags:", "- code", "- scoder-ray", "---", "",
        f"# {store.run_id}: SCoder model", "",
        f"`{cfg.models.scoder}` fine-tuned on {final.get('rows', '?')} synthetic samples (dataset digest "
        f"`{final.get('dataset_digest', '')}`) by scoder-ray; checkpoint `{name}`.", "",
        training, "",
        *(f"Warning: {w}" for w in trained.get("warnings", [])), "",
        f"Evaluation{measured} (pass@k, executed in scoder-ray's sandbox): `{json.dumps(results)}`", ""]))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def push_to_hub(folder: Path, target: str, repo_type: str = "dataset") -> str:
    """Upload an exported folder to `hub:ORG/NAME` (token from HF_TOKEN or the local login)."""
    if not target.startswith("hub:") or target.count("/") != 1:
        raise ValueError(f"--to {target!r}: expected hub:ORG/NAME")
    from huggingface_hub import HfApi

    repo = target[len("hub:"):]
    api = HfApi()
    api.create_repo(repo, repo_type=repo_type, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type)
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
