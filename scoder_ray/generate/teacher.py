"""The teacher: any OpenAI-compatible chat-completions endpoint, called with bounded concurrency.

- Every response is cached on disk under `teacher.cache_dir`, keyed by a digest of the request body
  (model, messages, sampling parameters — never the key), written atomically as soon as it arrives:
  an interrupted or repeated bootstrap never pays twice for the same request.
- 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter (honouring
  Retry-After), up to `teacher.max_retries`; other 4xx fail at once with the server's message.
- The API key is read from the environment variable named by `teacher.api_key_env`. It lives only in
  the request header: it is not in the config, the cache, the logs or any error text.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

from scoder_ray.config import TeacherConf

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class TeacherError(RuntimeError):
    """The teacher failed for good (after retries, or with a non-retryable status)."""


@dataclass
class Usage:
    requests: int = 0  # sent over the network, retries included
    cached: int = 0  # answered from the cache
    prompt_tokens: int = 0  # of fresh (paid) responses
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def cost(self, conf: TeacherConf) -> float:
        return (self.prompt_tokens * conf.price_in_per_mtok + self.completion_tokens * conf.price_out_per_mtok) / 1e6


def request_body(conf: TeacherConf, messages: list[dict[str, str]], seed: Optional[int] = None,
                 layout: bool = False) -> dict[str, Any]:
    """A chat completion request; `layout` adds vLLM's guided decoding to the sample layout."""
    body: dict[str, Any] = {"model": conf.model, "messages": messages, "temperature": conf.temperature,
                            "max_tokens": conf.max_tokens}
    if seed is not None:
        body["seed"] = seed
    if layout:
        from scoder_ray.prompts import LAYOUT_REGEX

        body["structured_outputs"] = {"regex": LAYOUT_REGEX}
    return body


def cache_key(base_url: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"url": base_url.rstrip("/"), "body": body}, sort_keys=True).encode()).hexdigest()


class Teacher:
    def __init__(self, conf: TeacherConf):
        self.conf = conf
        self.cache = Path(os.path.expanduser(conf.cache_dir))
        self.usage = Usage()
        self._key = os.environ.get(conf.api_key_env, "")

    def _cache_path(self, key: str) -> Path:
        return self.cache / key[:2] / f"{key}.json"

    async def complete(self, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion (the parsed JSON response), from the cache when it has it."""
        key = cache_key(self.conf.base_url, body)
        path = self._cache_path(key)
        if path.is_file():
            self.usage.cached += 1
            return json.loads(path.read_text())
        response = await self._post(client, body)
        usage = response.get("usage") or {}
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}-{random.getrandbits(32)}")
        tmp.write_text(json.dumps(response))
        tmp.replace(path)
        return response

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        url = self.conf.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        delay = 1.0
        for attempt in range(self.conf.max_retries + 1):
            self.usage.requests += 1
            retry_after: Optional[float] = None
            try:
                r = await client.post(url, json=body, headers=headers, timeout=self.conf.timeout_s)
                if r.status_code == 200:
                    return r.json()
                what = f"HTTP {r.status_code}"
                if r.status_code not in RETRY_STATUS:
                    raise TeacherError(f"teacher at {self.conf.base_url} refused the request: {what}: {r.text[:300]}")
                if r.headers.get("retry-after", "").replace(".", "", 1).isdigit():
                    retry_after = float(r.headers["retry-after"])
            except (httpx.TimeoutException, httpx.TransportError) as e:
                what = type(e).__name__
            self.usage.errors[what] = self.usage.errors.get(what, 0) + 1
            if attempt == self.conf.max_retries:
                raise TeacherError(f"teacher at {self.conf.base_url} failed after {attempt + 1} attempts: last {what}")
            self.usage.retries += 1
            await asyncio.sleep(min(self.conf.max_backoff_s, retry_after or delay * (0.5 + random.random())))
            delay *= 2
        raise AssertionError("unreachable")

    def run(self, bodies: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
        """Complete every request, at most `max_concurrency` at a time; results in input order."""
        return asyncio.run(self._run(bodies, progress))

    async def _run(self, bodies: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
        from tqdm import tqdm

        limit = asyncio.Semaphore(self.conf.max_concurrency)
        bar = tqdm(total=len(bodies), desc="teacher", unit="req", disable=not progress)
        limits = httpx.Limits(max_connections=self.conf.max_concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            async def one(body: dict[str, Any]) -> dict[str, Any]:
                async with limit:
                    result = await self.complete(client, body)
                    bar.update(1)
                    return result

            try:
                return await asyncio.gather(*(one(b) for b in bodies))
            finally:
                bar.close()


def completion_text(response: dict[str, Any]) -> tuple[str, str]:
    """(text, finish_reason) of the first choice."""
    choice = (response.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason") or ""

