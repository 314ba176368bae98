"""A stand-in for a proprietary teacher behind an OpenAI-compatible API, for whole-loop tests.

It answers `POST /v1/chat/completions` (and Anthropic's `POST /v1/messages`) for a seed it knows (one of the 64 documented stdlib functions, as
the tiny-loop preset's seeds are) with the sample a good teacher would write for it, in the synthesizer's
layout, with token usage; any other prompt gets a refusal (which the bootstrap counts as unparsable).
`GET /v1/models` lists its model, for the pre-flight check. It is an external service's stand-in, not a
part of scoder-ray: the bootstrap's own client, cache, retries and budget talk to it over real HTTP.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from scoder_ray import prompts
from scoder_ray.seeds import documented_functions

MODEL = "stand-in-teacher"


class StandInTeacher(ThreadingHTTPServer):
    """Serves from a daemon thread on 127.0.0.1 (of the network namespace it is created in). `delay_s`
    holds each answer back, so a test can kill its client while requests are in flight; `served` lists the
    seed each answered request was for, in order."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 resets connections under 16 concurrent requests (a ReadError)
    model = MODEL

    def __init__(self, delay_s: float = 0.0, models: tuple[str, ...] = (MODEL,)):
        self.delay_s, self.served, self.lock, self.models = delay_s, [], threading.Lock(), models
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body) of every POST
        self.samples = {r["snippet"].strip("\n"): r for r in documented_functions(64, seed="itself")}
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body: dict) -> tuple[str, str]:
        """(completion text, the seed's function name or "?") for one request body."""
        user = body["messages"][-1]["content"]
        for snippet, row in self.samples.items():
            if f"\n{snippet}\n```" in user:
                return prompts.synthesizer_response(row["problem"], row["solution"]), row["problem"].split("`")[1]
        return "I can only help with the standard library's documented functions.", "?"


class _Handler(BaseHTTPRequestHandler):
    server: StandInTeacher

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.rstrip("/").endswith("/models"):
            return self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})
        self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), body))
        text, name = self.server.answer(body)
        time.sleep(self.server.delay_s)
        words = sum(len(m["content"].split()) for m in body["messages"])
        if self.path.rstrip("/").endswith("/messages"):  # Anthropic's Messages API
            self._json(200, {"id": "msg_stand_in", "type": "message", "role": "assistant", "model": body["model"],
                             "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                             "usage": {"input_tokens": words, "output_tokens": len(text.split())}})
        else:
            self._json(200, {"id": "chatcmpl-stand-in", "object": "chat.completion", "model": MODEL,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": words, "completion_tokens": len(text.split())}})
        with self.server.lock:
            self.server.served.append(name)

    def log_message(self, *args):
        pass
