"""List prices of common teacher models, for the bootstrap's cost and `teacher.max_cost_usd`.

USD per million prompt / completion tokens, as the providers published them (checked 2025-10; prices
change: `teacher.price_in_per_mtok` / `price_out_per_mtok` override them). A model id matches the longest
entry it starts with when what follows is nothing or a dated suffix (`gpt-4o-2024-08-06` is gpt-4o,
`claude-sonnet-4-20250514` is claude-sonnet-4; `gpt-4o-mini` is its own entry, `o3-mini` matches none).
A routing prefix such as `openai/` or `anthropic/` (OpenRouter, LiteLLM) is ignored.
"""
from __future__ import annotations

import re
from urllib.parse import urlparse

from scoder_ray.config import TeacherConf

PRICES: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    # Anthropic
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
}
_DATED = re.compile(r"^(-\d[\d-]*|-latest)?$")


def list_price(model: str) -> tuple[str, float, float] | None:
    """(table entry, in, out) for a model id, or None when the table has no price for it."""
    name = model.rsplit("/", 1)[-1].lower()
    for entry in sorted(PRICES, key=len, reverse=True):
        if name.startswith(entry) and _DATED.match(name[len(entry):]):
            return (entry, *PRICES[entry])
    return None


def teacher_prices(conf: TeacherConf) -> tuple[float, float, str]:
    """(USD per M prompt tokens, per M completion tokens, where they come from): the config's when set,
    else the list price, else 0 — `local` for an endpoint on this machine (a vLLM you serve costs nothing
    per token), `unknown` otherwise."""
    if conf.price_in_per_mtok is not None or conf.price_out_per_mtok is not None:
        return conf.price_in_per_mtok or 0.0, conf.price_out_per_mtok or 0.0, "config"
    found = list_price(conf.model)
    if found:
        return found[1], found[2], f"list price of {found[0]}"
    host = urlparse(conf.base_url).hostname or ""
    return 0.0, 0.0, "local" if host in ("127.0.0.1", "localhost", "::1") else "unknown"
