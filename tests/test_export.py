"""`scoder-ray export`: every format read back with `datasets` (and LLaMA-Factory's dataset_info.json), the card, the model copy."""
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from scoder_ray.cli import main
from scoder_ray.config import load_config
from scoder_ray.store import RunStore, write_table

ROWS = [{"cand_id": f"c{i}", "seed_id": f"s{i}", "snippet": "def f(): pass",
         "problem": f"Write `add{i}(a, b)` that returns the sum of two integers plus {i}.",
         "solution": f"def add{i}(a, b):\n    return a + b + {i}", "tokens": 20} for i in range(3)]


@pytest.fixture
def finished_run(tmp_path):
    cfg = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=r"])
    store = RunStore.for_config(cfg)
    store.write_config(cfg)

    def final(out: str) -> dict:
        write_table(f"{out}/data/part-0.parquet", pa.Table.from_pylist(ROWS))
        return {"rows": 3, "generated": 9, "seeds": 3, "seeds_yielding": 3, "dataset_digest": "d" * 64,
                "rejected": {"prompt_echo": 6}, "audit": {"placeholders": 0}}

    store.run_stage("bootstrap", {}, {}, lambda out: {"rows": 60, "execution": {"ran": 64, "passed": 60}})
    store.run_stage("final", {}, {}, final)
    return f"{tmp_path}/runs/r", tmp_path


@pytest.mark.parametrize("fmt, column", [("messages", "messages"), ("alpaca", "instruction"),
                                         ("sharegpt", "conversations"), ("parquet", "problem")])
def test_export_is_read_back_by_datasets(finished_run, fmt, column, capsys):
    import datasets

    run_dir, tmp_path = finished_run
    out = tmp_path / f"export-{fmt}"
    assert main(["export", run_dir, "--format", fmt, "--out", str(out)]) == 0
    ds = datasets.load_dataset(str(out))["train"]
    assert ds.num_rows == 3 and column in ds.column_names
    first = ds[0]
    if fmt == "messages":
        assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
        assert first["messages"][1]["content"].startswith("```python\ndef add0")
    if fmt == "alpaca":
        assert first["input"] == "" and first["instruction"].startswith("Write `add0")
    card = (out / "README.md").read_text()
    assert "dataset digest | " + "d" * 64 in card and "generated / kept | 9 / 3" in card
    assert '{"prompt_echo": 6}' in card and "Filters: placeholders" in card
    assert "solutions reading names they never define or import, degenerate samples" in card
    assert "60 samples (run in the sandbox: 60 of 64 passed)" in card and "`prompts.synthesizer: default`" in card
    said = capsys.readouterr().out
    assert "datasets.load_dataset" in said
    if fmt != "parquet":  # LLaMA-Factory's registration, read as its data/README.md defines it
        info = json.loads((out / "dataset_info.json").read_text())
        assert list(info) == ["r"] and f"LLaMA-Factory: dataset_dir: {out}  dataset: r" in said
        entry = info["r"]
        data = out / entry["file_name"]
        assert entry["file_sha1"] == hashlib.sha1(data.read_bytes()).hexdigest()
        records = [json.loads(line) for line in data.read_text().splitlines()]
        if entry.get("formatting", "alpaca") == "alpaca":
            assert all(r[entry["columns"][c]] is not None for r in records for c in ("prompt", "query", "response"))
        else:  # sharegpt: user turns at odd positions, assistant at even, under the named tags
            tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                    **entry.get("tags", {})}
            for r in records:
                turns = r[entry["columns"]["messages"]]
                assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
                assert turns[1][tags["content_tag"]].startswith("```python\ndef add")
    else:
        assert not (out / "dataset_info.json").exists()


@pytest.mark.slow  # builds the tiny model
def test_export_copies_the_model_with_a_card(finished_run, tiny_model_dir):
    run_dir, tmp_path = finished_run

    def scoder(out: str) -> dict:
        shutil.copytree(tiny_model_dir, f"{out}/ckpt_01")
        shutil.copytree(tiny_model_dir, f"{out}/ckpt_02")
        (Path(out) / "ckpt_01" / "which").write_text("ckpt_01")
        return {"rows": 3, "checkpoints": [{"name": "ckpt_01", "step": 3, "eval_loss": 1.2},
                                           {"name": "ckpt_02", "step": 6, "eval_loss": 1.25}],
                "total_steps": 6, "val_rows": 2, "eval_loss": 1.25,
                "best_eval": {"step": 3, "loss": 1.2}, "warnings": ["the held-out loss rose from 1.2000 at step 3"]}

    RunStore.open(run_dir).run_stage("train_scoder", {}, {}, scoder)
    assert main(["export", run_dir, "--out", str(tmp_path / "d"), "--model", str(tmp_path / "m")]) == 0
    model = Path(tmp_path / "m")
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    card = (model / "README.md").read_text()
    assert "SCoder model" in card and ("Training: 3 rows, 1 epoch, 6 optimizer steps, lr 0.001 (cosine), full "
                                       "fine-tuning, DeepSpeed ZeRO-2, fp32, max 512 tokens.") in card
    assert "Held-out loss on 2 rows never trained on: 1.2500 at the last step (lowest 1.2000, step 3)" in card
    assert "Warning: the held-out loss rose from 1.2000 at step 3" in card
    assert not (model / "which").exists() and "checkpoint `ckpt_02`" in card  # the last, by default
    # --checkpoint best: the lowest held-out loss; the card says pass@k was measured on another checkpoint
    assert main(["export", run_dir, "--out", str(tmp_path / "d"), "--model", str(tmp_path / "b"),
                 "--checkpoint", "best"]) == 0
    card = (tmp_path / "b" / "README.md").read_text()
    assert (tmp_path / "b" / "which").read_text() == "ckpt_01" and "checkpoint `ckpt_01`" in card
    assert "; 1.2000 at this checkpoint's step 3." in card
    assert "Evaluation of the last checkpoint, ckpt_02, not this one (pass@k" in card
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model).num_parameters() > 0


def test_export_names_a_checkpoint_it_cannot_choose(finished_run, tiny_model_dir, capsys):
    run_dir, tmp_path = finished_run
    RunStore.open(run_dir).run_stage("train_scoder", {}, {}, lambda out: (
        shutil.copytree(tiny_model_dir, f"{out}/ckpt_01"), {"rows": 3, "checkpoints": [{"name": "ckpt_01", "step": 3}]})[1])
    args = ["export", run_dir, "--out", str(tmp_path / "d"), "--model", str(tmp_path / "m")]
    assert main(args + ["--checkpoint", "ckpt_09"]) == 2
    assert "--checkpoint 'ckpt_09': expected last, best or one of ckpt_01" in capsys.readouterr().err
    assert main(args + ["--checkpoint", "best"]) == 2
    assert "had no held-out loss (train.scoder.val_size was 0)" in capsys.readouterr().err
    assert main(args[:4] + ["--checkpoint", "best"]) == 2
    assert "give --model DIR too" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()  # nothing written


def test_export_refuses_what_is_not_there(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    cfg = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=empty"])
    RunStore.for_config(cfg).write_config(cfg)
    assert main(["export", f"{tmp_path}/runs/empty", "--out", str(tmp_path / "x")]) == 2
    assert "no final dataset yet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
