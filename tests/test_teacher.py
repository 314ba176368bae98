"""The teacher client against a real local HTTP server that misbehaves the way gateways do."""
import json
import math
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scoder_ray.config import load_config
from scoder_ray.config import ConfigError
from scoder_ray.generate.teacher import Teacher, TeacherError, completion_text, request_body, retry_after_s

GOOD = {"choices": [{"message": {"content": "### Problem\nAdd two numbers."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}


class Scripted(ThreadingHTTPServer):
    """Answers each POST with the next (status, headers, body) of `script`, then GOOD forever."""

    def __init__(self, script):
        self.script, self.served, self.headers = list(script), [], []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, headers, body = self.server.script.pop(0) if self.server.script else (200, {}, json.dumps(GOOD))
        self.server.served.append((status, time.monotonic()))
        self.server.headers.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(status)
        for k, v in {"content-type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def teacher(tmp_path, url, *overrides):
    cfg = load_config("tiny", [f"teacher.base_url={url}", f"teacher.cache_dir={tmp_path}/cache", "teacher.max_retries=4",
                               "teacher.max_backoff_s=0.2", *overrides])
    return Teacher(cfg.teacher), cfg.teacher


def test_a_200_that_is_not_a_completion_is_retried_and_never_cached(tmp_path):
    server = Scripted([
        (200, {"content-type": "text/html"}, "<html>502 Bad Gateway</html>"),  # a gateway's error page
        (200, {}, json.dumps({"error": {"message": "overloaded", "type": "server_error"}})),
        (200, {}, json.dumps({"choices": []})),
    ])
    t, conf = teacher(tmp_path, server.url)
    body = request_body(conf, [{"role": "user", "content": "hi"}], seed=1)
    assert t.run([body], progress=False) == [GOOD]
    assert len(server.served) == 4 and t.usage.retries == 3
    assert set(t.usage.errors) == {"a 200 whose body is not JSON", "a 200 carrying an error", "a 200 without choices"}
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == GOOD  # only the real completion
    again, _ = teacher(tmp_path, server.url)
    assert again.run([body], progress=False) == [GOOD] and len(server.served) == 4  # from the cache


def test_failures_name_the_endpoint_the_seed_and_the_cause(tmp_path):
    server = Scripted([(200, {}, json.dumps({"choices": []}))] * 5)
    t, conf = teacher(tmp_path, server.url)
    with pytest.raises(TeacherError, match=rf"teacher at {server.url} failed for seed abc123 after 5 attempts: "
                                           "last a 200 without choices"):
        t.run([request_body(conf, [{"role": "user", "content": "x"}])], progress=False, labels=["seed abc123"])
    refused = Scripted([(401, {}, '{"error": "bad key"}')])
    t, conf = teacher(tmp_path, refused.url)
    with pytest.raises(TeacherError, match="refused the request for seed s9: HTTP 401"):
        t.run([request_body(conf, [{"role": "user", "content": "y"}])], progress=False, labels=["seed s9"])


@pytest.mark.parametrize("provider, refusal", [
    ("openai", {"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                                     "resulted in 130412 tokens.", "type": "invalid_request_error",
                          "code": "context_length_exceeded"}}),
    ("anthropic", {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "prompt is too long: 210412 tokens > 200000 maximum"}}),
])
def test_a_request_longer_than_the_context_gets_an_empty_answer_not_an_error(tmp_path, monkeypatch, provider, refusal):
    """One seed too long for the teacher's context must not stop a paid bootstrap: its answer is empty (finish
    reason prompt_too_long, not cached, not retried); any other 400 still stops it, naming the request."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    good = GOOD if provider == "openai" else {"content": [{"type": "text", "text": "### Problem\nAdd."}],
                                              "stop_reason": "end_turn", "usage": {"input_tokens": 9, "output_tokens": 9}}
    server = Scripted([(400, {}, json.dumps(refusal)), (200, {}, json.dumps(good))])
    t, conf = teacher(tmp_path, server.url, f"teacher.provider={provider}")
    bodies = [request_body(conf, [{"role": "user", "content": c}], seed=1) for c in ("long", "short")]
    first, second = t.run(bodies, progress=False)  # sent concurrently: either may meet the 400
    answers = sorted([completion_text(first), completion_text(second)])
    assert answers[0] == ("", "prompt_too_long") and answers[1][1] == "stop"
    assert len(server.served) == 2 and t.usage.errors.get("prompt_too_long") == 1 and t.usage.retries == 0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # only the real answer
    other = Scripted([(400, {}, json.dumps({"error": {"message": "temperature must be <= 2", "type": "invalid_request_error"}}))])
    t, conf = teacher(tmp_path / "b", other.url, f"teacher.provider={provider}")
    with pytest.raises(TeacherError, match="refused the request for seed s1: HTTP 400"):
        t.run([request_body(conf, [{"role": "user", "content": "z"}])], progress=False, labels=["seed s1"])


def test_retry_after_in_both_forms():
    assert retry_after_s("2") == 2.0 and retry_after_s("0.5") == 0.5 and retry_after_s("soon") is None
    assert 28 <= retry_after_s(formatdate(time.time() + 30, usegmt=True)) <= 30
    assert retry_after_s(formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_an_http_date_retry_after_is_honoured_by_the_sdk(tmp_path):
    # An HTTP date has whole seconds: a date 3 s past the next whole second is 3-4 s ahead when written, so
    # at least 2 s ahead whatever the server and client add; the first backoff alone is at most 1.5 s.
    server = Scripted([(429, {"retry-after": formatdate(math.ceil(time.time()) + 3, usegmt=True)}, "{}")])
    t, conf = teacher(tmp_path, server.url, "teacher.max_backoff_s=8")
    t.run([request_body(conf, [{"role": "user", "content": "z"}])], progress=False)
    (_, first), (_, second) = server.served
    assert second - first >= 2.0
    # The official SDK sent both attempts (its retry counted by it); our transport counted both too.
    assert all(h["user-agent"].startswith("AsyncOpenAI/Python") for h in server.headers)
    assert [h.get("x-stainless-retry-count") for h in server.headers] == ["0", "1"]
    assert t.usage.requests == 2 and t.usage.retries == 1 and t.usage.errors == {"HTTP 429": 1}


def test_the_budget_stops_new_requests_and_a_larger_one_resumes(tmp_path):
    server = Scripted([])
    t, conf = teacher(tmp_path, server.url, "teacher.max_requests=2", "teacher.max_concurrency=1")
    bodies = [request_body(conf, [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    with pytest.raises(TeacherError, match=r"budget reached before seed 2: 2 requests sent \(teacher.max_requests=2\)"):
        t.run(bodies, progress=False, labels=[f"seed {i}" for i in range(4)])
    assert len(server.served) == 2
    t, conf = teacher(tmp_path, server.url, "teacher.max_requests=10")
    assert len(t.run(bodies, progress=False)) == 4 and len(server.served) == 4 and t.usage.cached == 2
    priced, _ = teacher(tmp_path, server.url, "teacher.max_cost_usd=0.01", "teacher.price_out_per_mtok=10",
                        "teacher.max_concurrency=1")
    with pytest.raises(TeacherError, match=r"\$0.01 spent \(teacher.max_cost_usd=0.01\)"):
        priced.run([request_body(conf, [{"role": "user", "content": f"new{i}"}]) for i in range(3)], progress=False)


class Models(BaseHTTPRequestHandler):
    """GET /v1/models as an OpenAI-compatible server answers it; 401 without the right key."""

    def do_GET(self):  # noqa: N802
        ok = self.headers.get("authorization") == "Bearer right"
        body = json.dumps({"data": [{"id": "gpt-x"}]} if ok else {"error": "no key"}).encode()
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_preflight_says_what_to_do_in_one_line(monkeypatch):
    from scoder_ray.generate.teacher import preflight

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    conf = lambda *o: load_config("tiny", [f"teacher.base_url={url}", "teacher.model=gpt-x", *o]).teacher  # noqa: E731
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TeacherError, match=r"refused the request \(HTTP 401\): \$OPENAI_API_KEY is not set"):
        preflight(conf())
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with pytest.raises(TeacherError, match=r"the key in \$OPENAI_API_KEY is wrong"):
        preflight(conf())
    monkeypatch.setenv("OPENAI_API_KEY", "right")
    preflight(conf())
    with pytest.raises(TeacherError, match="does not serve teacher.model='gpt-y'; it serves gpt-x"):
        preflight(conf("teacher.model=gpt-y"))
    server.shutdown()
    server.server_close()
    with pytest.raises(TeacherError, match=f"teacher at {url} is not reachable .*teacher.samples_file"):
        preflight(conf(), timeout_s=2)


def test_run_checks_the_teacher_before_any_work(tmp_path, capsys, monkeypatch):
    """`scoder-ray run` with no teacher: one line, exit 2, before Ray, the lease or any stage."""
    from scoder_ray.cli import main

    code = main(["run", "--preset", "tiny", f"run.root={tmp_path}", "run.id=t", "teacher.base_url=http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert code == 2 and "teacher at http://127.0.0.1:9/v1 is not reachable" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_list_prices_match_dated_ids_and_the_config_overrides_them():
    from scoder_ray.generate.prices import list_price, teacher_prices

    assert list_price("gpt-4o-2024-08-06") == ("gpt-4o", 2.5, 10.0)
    assert list_price("gpt-4o-mini") == ("gpt-4o-mini", 0.15, 0.6)  # its own entry, not gpt-4o's
    assert list_price("anthropic/claude-sonnet-4-20250514")[0] == "claude-sonnet-4"
    assert list_price("o3-mini") is None and list_price("teacher") is None
    conf = lambda *o: load_config("tiny", list(o)).teacher  # noqa: E731
    assert teacher_prices(conf("teacher.model=gpt-4.1-mini")) == (0.4, 1.6, "list price of gpt-4.1-mini")
    assert teacher_prices(conf("teacher.model=gpt-4.1-mini", "teacher.price_in_per_mtok=1")) == (1.0, 0.0, "config")
    assert teacher_prices(conf("teacher.model=mine"))[2] == "local"  # the default endpoint is 127.0.0.1
    assert teacher_prices(conf("teacher.model=mine", "teacher.base_url=https://llm.example.com/v1"))[2] == "unknown"
    with pytest.raises(ConfigError, match=r"teacher.max_cost_usd: .*a budget needs prices: teacher.model='mine'"):
        load_config("tiny", ["teacher.model=mine", "teacher.base_url=https://llm.example.com/v1", "teacher.max_cost_usd=5"])
    with pytest.raises(ConfigError, match="teacher.provider"):
        load_config("tiny", ["teacher.provider=cohere"])


def test_the_anthropic_messages_api_is_a_second_provider(tmp_path, monkeypatch):
    """Requests go to /v1/messages with Anthropic's headers and body; answers come back (and are cached) in
    the chat-completion shape the parser reads; usage is priced at the model's list price."""
    from scoder_ray import prompts
    from scoder_ray.generate.teacher import preflight
    from scoder_ray.seeds import documented_functions
    from stand_in_teacher import StandInTeacher

    server = StandInTeacher(models=("claude-sonnet-4-20250514",))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    t, conf = teacher(tmp_path, server.url, "teacher.provider=anthropic", "teacher.model=claude-sonnet-4-20250514")
    rows = documented_functions(3, seed="itself")
    bodies = [request_body(conf, prompts.chat(prompts.synthesizer_prompt(r["snippet"])), seed=7) for r in rows]
    answers = t.run(bodies, progress=False)
    path, headers, sent = server.requests[0]
    assert path == "/v1/messages" and headers["x-api-key"] == "sk-ant-test" and headers["anthropic-version"]
    assert "authorization" not in {k.lower() for k in headers} and "seed" not in sent and sent["max_tokens"]
    for row, answer in zip(rows, answers):
        text, finish = completion_text(answer)
        assert finish == "stop" and prompts.parse_sample(text, row["snippet"])[:2] == (row["problem"], row["solution"])
    assert t.usage.completion_tokens > 0
    assert t.usage.cost(conf) == pytest.approx((3 * t.usage.prompt_tokens + 15 * t.usage.completion_tokens) / 1e6)
    again, _ = teacher(tmp_path, server.url, "teacher.provider=anthropic", "teacher.model=claude-sonnet-4-20250514")
    assert again.run(bodies, progress=False) == answers and again.usage.cached == 3 and len(server.requests) == 3
    preflight(conf)  # GET /v1/models lists the model
    server.shutdown()


def test_the_stand_in_teacher_is_one_flag_away(tmp_path, capsys):
    """`--stand-in-teacher`: the demo's stand-in samples instead of an endpoint, said loudly; no pre-flight."""
    from scoder_ray.cli import main
    from scoder_ray.loop import needs_teacher
    from scoder_ray.store import RunStore

    assert main(["config", "--preset", "tiny", "--stand-in-teacher", "teacher.base_url=http://127.0.0.1:9/v1"]) == 0
    out = capsys.readouterr()
    assert "samples_file: builtin:stdlib-documented" in out.out and "STAND-IN TEACHER SAMPLES" in out.err
    cfg = load_config("tiny", ["teacher.samples_file=builtin:stdlib-documented", f"run.root={tmp_path}"])
    assert not needs_teacher(cfg, RunStore(str(tmp_path), "x", create=False))
