"""The teacher: any OpenAI-compatible chat-completions endpoint through the official `openai` SDK, or
Anthropic's Messages API (`teacher.provider: anthropic`) over HTTP, called with bounded concurrency.

- Requests are built, cached and read back in one shape (OpenAI's chat completion): an Anthropic request is
  translated when it is sent and its answer normalised before it is cached, so everything downstream (the
  cache, the parser, usage and cost) is the same for both.
- Every response is cached on disk under `teacher.cache_dir`, keyed by a digest of the request body
  (model, messages, sampling parameters — never the key), written atomically as soon as it arrives:
  an interrupted or repeated bootstrap never pays twice for the same request.
- Retries, up to `teacher.max_retries` per request: 408/409/429/5xx, timeouts and connection errors by the
  SDK's own policy (exponential backoff, Retry-After honoured in seconds or as an HTTP date; the Anthropic
  path does the same by hand, its waits capped at `teacher.max_backoff_s`); and by this module a 200 that is
  not a completion (a gateway's HTML page, an `error` object, no `choices`), which is never cached. Other
  4xx fail at once with the server's message. Every failure is one line naming the endpoint, the request
  (the seed) and the cause.
- Every HTTP attempt, the SDK's own retries included, is counted by the client's transport: the usage
  record and `teacher.max_requests` see them all. `teacher.max_requests` / `teacher.max_cost_usd` bound a
  run: past them no new request is sent.
- The API key is read from the environment variable named by `teacher.api_key_env` (default: the
  provider's own). It lives only in the request header: it is not in the config, the cache, the logs or
  any error text.
- Cost: token usage times `teacher.price_*`, or the model's list price (generate/prices.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import httpx2

from scoder_ray import prompts
from scoder_ray.config import TeacherConf

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}  # 529: Anthropic's `overloaded`
ANTHROPIC_VERSION = "2023-06-01"
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


# A 400/413 that says the request does not fit the model's context (OpenAI's context_length_exceeded, vLLM's
# "maximum context length", Anthropic's "prompt is too long"): that request's fault, not the run's.
CONTEXT_REFUSAL = re.compile(r"context.length|maximum context|prompt is too long|too many (input )?tokens", re.IGNORECASE)


class TeacherError(RuntimeError):
    """The teacher failed for good (after retries, with a non-retryable status, or out of budget)."""


class PromptTooLong(Exception):
    """The teacher refused one request as longer than its context."""


def too_long(status: int, text: str) -> bool:
    return status in (400, 413) and bool(CONTEXT_REFUSAL.search(text))


def retry_after_s(value: str) -> Optional[float]:
    """Retry-After as seconds: `120` or an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`); None if neither."""
    value = (value or "").strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def not_a_completion(r: "httpx.Response") -> tuple[str, str]:
    """(kind, detail) of why a 200 response is not a chat completion; ("", "") when it is one."""
    try:
        data = r.json()
    except ValueError:
        return "a 200 whose body is not JSON", f" ({r.headers.get('content-type', '?')}: {r.text[:80]!r})"
    if not isinstance(data, dict):
        return "a 200 whose JSON is not an object", ""
    if data.get("error"):
        return "a 200 carrying an error", f": {str(data['error'])[:200]}"
    if not data.get("choices") and not isinstance(data.get("content"), list):  # OpenAI's / Anthropic's shape
        return "a 200 without choices", ""
    return "", ""


def key_env(conf: TeacherConf) -> str:
    """The environment variable that holds the key."""
    return conf.api_key_env or ("ANTHROPIC_API_KEY" if conf.provider == "anthropic" else "OPENAI_API_KEY")


def auth_headers(conf: TeacherConf, key: str) -> dict[str, str]:
    if conf.provider == "anthropic":
        return {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": key} if key else {})}
    return {"Authorization": f"Bearer {key}"} if key else {}


def anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped chat request as a Messages API request (system messages become `system`; the
    sampling seed has no counterpart there and is left out)."""
    system = "\n\n".join(m["content"] for m in body["messages"] if m["role"] == "system")
    out = {"model": body["model"], "max_tokens": body["max_tokens"], "temperature": body["temperature"],
           "messages": [m for m in body["messages"] if m["role"] != "system"]}
    return {**out, "system": system} if system else out


def from_anthropic(data: dict[str, Any]) -> dict[str, Any]:
    """A Messages API answer in the chat-completion shape the cache and the parser read."""
    text = "".join(c.get("text", "") for c in data.get("content") or [] if c.get("type") == "text")
    usage = data.get("usage") or {}
    return {"id": data.get("id"), "model": data.get("model"), "provider": "anthropic",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _STOP.get(data.get("stop_reason") or "", data.get("stop_reason") or "")}],
            "usage": {"prompt_tokens": int(usage.get("input_tokens") or 0),
                      "completion_tokens": int(usage.get("output_tokens") or 0)}}


@dataclass
class Usage:
    requests: int = 0  # sent over the network, retries included
    cached: int = 0  # answered from the cache
    prompt_tokens: int = 0  # of fresh (paid) responses
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def cost(self, conf: TeacherConf) -> float:
        from scoder_ray.generate.prices import teacher_prices

        price_in, price_out, _ = teacher_prices(conf)
        return (self.prompt_tokens * price_in + self.completion_tokens * price_out) / 1e6


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


class CountingTransport(httpx2.AsyncBaseTransport):
    """The SDK client's transport: counts every HTTP attempt it makes (its retries included) and notes each
    failed one by kind (`HTTP 500`, `ReadTimeout`...)."""

    def __init__(self, usage: Usage, max_connections: int):
        self.usage = usage
        self.inner = httpx2.AsyncHTTPTransport(limits=httpx2.Limits(max_connections=max_connections))

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.usage.requests += 1
        try:
            response = await self.inner.handle_async_request(request)
        except Exception as e:
            self.usage.note(type(e).__name__)
            raise
        if response.status_code != 200:
            self.usage.note(f"HTTP {response.status_code}")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


SDK_FIELDS = ("model", "messages", "temperature", "max_tokens", "seed")  # the rest goes as extra_body


def cache_key(base_url: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"url": base_url.rstrip("/"), "body": body}, sort_keys=True).encode()).hexdigest()


class Teacher:
    def __init__(self, conf: TeacherConf):
        self.conf = conf
        self.cache = Path(os.path.expanduser(conf.cache_dir))
        self.usage = Usage()
        self._key = os.environ.get(key_env(conf), "")

    def _cache_path(self, key: str) -> Path:
        return self.cache / key[:2] / f"{key}.json"

    async def complete(self, client: Any, body: dict[str, Any], label: str = "") -> dict[str, Any]:
        """One chat completion (the parsed JSON response), from the cache when it has it. `label` names the
        request (e.g. its seed) in errors."""
        key = cache_key(self.conf.base_url, body)
        path = self._cache_path(key)
        if path.is_file():
            self.usage.cached += 1
            return json.loads(path.read_text())
        self._check_budget(label)
        post = self._post_anthropic if self.conf.provider == "anthropic" else self._post_openai
        try:
            response = await post(client, body, label)
        except PromptTooLong:  # an empty answer, not cached: a teacher with a longer context may take it
            self.usage.note(prompts.PROMPT_TOO_LONG)
            return {"choices": [{"message": {"content": ""}, "finish_reason": prompts.PROMPT_TOO_LONG}], "usage": {}}
        usage = response.get("usage") or {}
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}-{random.getrandbits(32)}")
        tmp.write_text(json.dumps(response))
        tmp.replace(path)
        return response

    def _check_budget(self, label: str) -> None:
        conf, spent = self.conf, self.usage.cost(self.conf)
        if conf.max_requests and self.usage.requests >= conf.max_requests:
            raise TeacherError(f"teacher budget reached before {label or 'a request'}: {self.usage.requests} requests "
                               f"sent (teacher.max_requests={conf.max_requests}); the answers so far are cached, a "
                               "rerun with a larger budget resumes")
        if conf.max_cost_usd and spent >= conf.max_cost_usd:
            raise TeacherError(f"teacher budget reached before {label or 'a request'}: ${spent:.2f} spent "
                               f"(teacher.max_cost_usd={conf.max_cost_usd}); the answers so far are cached, a rerun "
                               "with a larger budget resumes")

    async def _post_openai(self, client: Any, body: dict[str, Any], label: str = "") -> dict[str, Any]:
        """One completion through the SDK, which retries HTTP failures; a 200 that is not a completion is
        retried here, within the same `max_retries` for the request."""
        import openai  # (1 s to import: not at the CLI's start)

        about = f" for {label}" if label else ""
        known = {k: body[k] for k in SDK_FIELDS if k in body}
        extra = {k: v for k, v in body.items() if k not in known} or None
        used, delay = 0, 1.0
        while True:
            try:
                raw = await client.with_options(max_retries=self.conf.max_retries - used) \
                    .chat.completions.with_raw_response.create(**known, extra_body=extra)
            except openai.APIStatusError as e:
                if too_long(e.status_code, e.response.text):
                    raise PromptTooLong(e.response.text[:300]) from None
                if e.status_code in RETRY_STATUS:
                    raise TeacherError(f"teacher at {self.conf.base_url} failed{about} after {self.conf.max_retries + 1} "
                                       f"attempts: last HTTP {e.status_code}") from None
                raise TeacherError(f"teacher at {self.conf.base_url} refused the request{about}: HTTP {e.status_code}: "
                                   f"{e.response.text[:300]}") from None
            except openai.APIConnectionError as e:  # timeouts included, after the SDK's retries
                raise TeacherError(f"teacher at {self.conf.base_url} failed{about} after {self.conf.max_retries + 1} "
                                   f"attempts: last {type(e.__cause__ or e).__name__}") from None
            used += raw.retries_taken + 1
            self.usage.retries += raw.retries_taken
            kind, detail = not_a_completion(raw.http_response)
            if not kind:
                return raw.http_response.json()
            self.usage.note(kind)
            if used > self.conf.max_retries:
                raise TeacherError(f"teacher at {self.conf.base_url} failed{about} after {used} attempts: "
                                   f"last {kind}{detail}")
            self.usage.retries += 1
            await asyncio.sleep(min(self.conf.max_backoff_s, delay * (0.5 + random.random())))
            delay *= 2

    async def _post_anthropic(self, client: httpx.AsyncClient, body: dict[str, Any], label: str = "") -> dict[str, Any]:
        url = self.conf.base_url.rstrip("/") + "/messages"
        about = f" for {label}" if label else ""
        headers = auth_headers(self.conf, self._key)
        payload = anthropic_request(body)
        delay = 1.0
        for attempt in range(self.conf.max_retries + 1):
            self.usage.requests += 1
            retry_after: Optional[float] = None
            try:
                r = await client.post(url, json=payload, headers=headers, timeout=self.conf.timeout_s)
                if r.status_code == 200:
                    kind, detail = not_a_completion(r)
                    if not kind:
                        return from_anthropic(r.json())
                else:
                    kind, detail = f"HTTP {r.status_code}", ""
                    if too_long(r.status_code, r.text):
                        raise PromptTooLong(r.text[:300])
                    if r.status_code not in RETRY_STATUS:
                        raise TeacherError(f"teacher at {self.conf.base_url} refused the request{about}: {kind}: "
                                           f"{r.text[:300]}")
                    retry_after = retry_after_s(r.headers.get("retry-after", ""))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                kind, detail = type(e).__name__, ""
            what = kind + detail
            self.usage.note(kind)
            if attempt == self.conf.max_retries:
                raise TeacherError(f"teacher at {self.conf.base_url} failed{about} after {attempt + 1} attempts: "
                                   f"last {what}")
            self.usage.retries += 1
            await asyncio.sleep(min(self.conf.max_backoff_s, retry_after or delay * (0.5 + random.random())))
            delay *= 2
        raise AssertionError("unreachable")

    def run(self, bodies: list[dict[str, Any]], progress: bool = True,
            labels: Optional[list[str]] = None) -> list[dict[str, Any]]:
        """Complete every request, at most `max_concurrency` at a time; results in input order. `labels`
        name the requests in errors (e.g. `seed 3f2a…`)."""
        return asyncio.run(self._run(bodies, progress, labels or [""] * len(bodies)))

    async def _run(self, bodies: list[dict[str, Any]], progress: bool, labels: list[str]) -> list[dict[str, Any]]:
        from tqdm import tqdm

        limit = asyncio.Semaphore(self.conf.max_concurrency)
        bar = tqdm(total=len(bodies), desc="teacher", unit="req", disable=not progress)
        async with self._client() as client:
            async def one(body: dict[str, Any], label: str) -> dict[str, Any]:
                async with limit:
                    result = await self.complete(client, body, label)
                    bar.update(1)
                    return result

            try:
                return await asyncio.gather(*(one(b, label) for b, label in zip(bodies, labels)))
            finally:
                bar.close()


    def _client(self) -> Any:
        import openai

        conf = self.conf
        if conf.provider == "anthropic":
            return httpx.AsyncClient(limits=httpx.Limits(max_connections=conf.max_concurrency))
        transport = CountingTransport(self.usage, conf.max_concurrency)
        # "EMPTY": the SDK needs a key; a server without one (vLLM's default) ignores it.
        return openai.AsyncOpenAI(base_url=conf.base_url, api_key=self._key or "EMPTY", max_retries=conf.max_retries,
                                  timeout=conf.timeout_s, http_client=httpx2.AsyncClient(transport=transport))


def preflight(conf: TeacherConf, timeout_s: float = 10.0) -> None:
    """Before any work: the endpoint answers `GET /models`, accepts the key (or needs none), and serves
    the model. Raises TeacherError in one line saying what to do."""
    url = conf.base_url.rstrip("/")
    env = key_env(conf)
    key = os.environ.get(env, "")
    try:
        r = httpx.get(url + "/models", headers=auth_headers(conf, key), timeout=timeout_s)
    except (httpx.TimeoutException, httpx.TransportError) as e:
        raise TeacherError(f"teacher at {url} is not reachable ({type(e).__name__}): start the endpoint, fix "
                           "teacher.base_url, or set teacher.samples_file (the demo: teacher.samples_file="
                           "builtin:stdlib-documented)") from None
    if r.status_code in (401, 403):
        raise TeacherError(f"teacher at {url} refused the request (HTTP {r.status_code}): " + (
            f"the key in ${env} is wrong" if key else
            f"${env} is not set (teacher.api_key_env names the variable that holds the key)"))
    if r.status_code != 200:
        return  # some gateways do not list models: the requests themselves will tell
    try:
        served = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError):
        return
    if served and conf.model not in served:
        raise TeacherError(f"teacher at {url} does not serve teacher.model={conf.model!r}; it serves "
                           f"{', '.join(map(str, served[:10]))}")


def completion_text(response: dict[str, Any]) -> tuple[str, str]:
    """(text, finish_reason) of the first choice."""
    choice = (response.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason") or ""

