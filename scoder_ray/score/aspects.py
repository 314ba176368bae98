"""The aspect scorer: one request per candidate rates every aspect 0-9, with structured outputs.

The answer is constrained to the compact JSON object of the aspect schema — `{"a":d,"b":d,...}`, each
value a single digit — through a regular expression rather than vLLM's JSON-schema mode: with a JSON
schema a weak model pads with whitespace until max_tokens (SETUP.md), while the regex admits exactly
one layout, so every response is short and parses. Where a response still does not parse (guided
decoding unavailable, a server without it), `parse_aspects` falls back to the first digit after each
aspect name, and the fallback is counted.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

import numpy as np

from scoder_ray.config import AspectConf, EngineConf, ModelsConf, ScoreConf
from scoder_ray.generate.sample import EngineActor

SCORER_INSTRUCTION = """You are reviewing a synthetic programming exercise written from a seed code snippet.

Seed snippet:
```{lang}
{snippet}
```

Problem:
{problem}

Solution:
```python
{solution}
```

Rate the exercise on each aspect with an integer from 0 (worst) to 9 (best):
{rubrics}

Answer with one JSON object and nothing else, for example {example}"""


def scorer_prompt(aspects: list[AspectConf], snippet: str, problem: str, solution: str, lang: str = "python") -> str:
    rubrics = "\n".join(f"- {a.name}: {a.rubric}" for a in aspects)
    example = "{" + ",".join(f'"{a.name}":5' for a in aspects) + "}"
    return SCORER_INSTRUCTION.format(snippet=snippet.strip(), problem=problem.strip(), solution=solution.strip(),
                                     rubrics=rubrics, example=example, lang=lang or "python")


def aspect_regex(aspects: list[AspectConf]) -> str:
    return r"\{" + ",".join(f'"{re.escape(a.name)}":[0-9]' for a in aspects) + r"\}"


def parse_aspects(text: str, names: list[str]) -> tuple[Optional[dict[str, int]], bool]:
    """(scores, used_fallback); scores is None when even the fallback finds no digit for some aspect."""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and all(isinstance(data.get(n), int) and 0 <= data[n] <= 9 for n in names):
            return {n: int(data[n]) for n in names}, False
    except json.JSONDecodeError:
        pass
    scores = {}
    for n in names:
        m = re.search(re.escape(n) + r'"?\s*[:=]\s*"?([0-9])\b', text)
        if not m:
            return None, True
        scores[n] = int(m.group(1))
    return scores, True


class Scorer(EngineActor):
    """A vLLM engine actor that adds `aspect_<name>` columns (-1 where unparseable) and `aspects_fallback`: a
    Ray actor of the driver's (score/stage.py deals it blocks; it may serve several scoring stages)."""

    def __init__(self, model_path: str, engine: EngineConf, score: ScoreConf, seed: int, models: ModelsConf,
                 progress: Any = None):
        super().__init__(model_path, engine, seed, models, progress)
        self.score = score

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check()
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        aspects = list(self.score.aspects)
        names = [a.name for a in aspects]
        langs = batch.get("lang", [None] * len(batch["snippet"]))  # runs from before seeds had a language
        texts = self.chat_prompts([scorer_prompt(aspects, s, p, sol, lang) for s, p, sol, lang in
                                   zip(batch["snippet"], batch["problem"], batch["solution"], langs)])
        params = SamplingParams(temperature=0.0, max_tokens=self.score.max_tokens,
                                structured_outputs=StructuredOutputsParams(regex=aspect_regex(aspects)))
        outputs = await self.generate(texts, params)
        cols = {f"aspect_{n}": [] for n in names}
        fallback, raw = [], []
        for out in outputs:
            text = out.outputs[0].text
            scores, used = parse_aspects(text, names)
            for n in names:
                cols[f"aspect_{n}"].append(-1 if scores is None else scores[n])
            fallback.append(used)
            raw.append(text)
        result = dict(batch)
        result.update({k: np.array(v, dtype=np.int64) for k, v in cols.items()})
        result["aspects_fallback"] = np.array(fallback)
        result["scorer_raw"] = np.array(raw, dtype=object)
        result["engine_start_s"] = self.startup_column(len(outputs))
        self.tick(len(outputs))
        return result

    async def score_block(self, block, progress: Any = None) -> tuple[Any, int]:
        """(the Arrow block with its scores, its rows), for kept_engines.deal; `progress`: this stage's."""
        from scoder_ray.ray_env import batch_to_table, table_to_batch

        self.progress = progress
        return batch_to_table(await self(table_to_batch(block))), block.num_rows
