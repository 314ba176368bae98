"""model_cache.local_model: model folders from the S3 server onto this node, once, whole, bounded."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scoder_ray.config import ModelsConf
from scoder_ray.model_cache import cache_key, evict, fetch_folder, local_model
from scoder_ray.store import filesystem, write_text


def upload_model(uri: str, size: int = 1000) -> None:
    write_text(f"{uri}/config.json", '{"model_type": "llama"}')
    write_text(f"{uri}/model.safetensors", "x" * size)
    write_text(f"{uri}/export_check/probe.safetensors", "p")


def test_a_run_model_on_s3_is_copied_once_and_whole(s3_server, tmp_path):
    uri = f"s3://{s3_server['bucket']}/models-{tmp_path.name}/ckpt_01"
    upload_model(uri)
    models = ModelsConf(cache_dir=str(tmp_path / "cache"))
    first = Path(local_model(uri, models))
    assert (first / "model.safetensors").stat().st_size == 1000 and (first / "export_check" / "probe.safetensors").is_file()
    fs, path = filesystem(uri)
    fs.delete_dir(path)  # the second use on this node reads nothing from the store
    assert Path(local_model(uri, models)) == first and (first / "config.json").is_file()


def test_concurrent_callers_on_a_node_share_one_download(s3_server, tmp_path):
    uri = f"s3://{s3_server['bucket']}/models-{tmp_path.name}/ckpt_02"
    upload_model(uri, size=3_000_000)
    code = ("import sys; from pathlib import Path; from scoder_ray.model_cache import fetch_folder; "
            "import scoder_ray.model_cache as m; d = fetch_folder(sys.argv[1], Path(sys.argv[2]), 10.0); "
            "print(d, (d / '.complete').stat().st_ino)")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({tuple(o) for o in outs}) == 1  # one folder, one .complete: written by one download
    assert not [p for p in os.listdir(tmp_path / "cache") if ".partial-" in p]


def test_a_partial_download_is_never_used(s3_server, tmp_path):
    uri = f"s3://{s3_server['bucket']}/models-{tmp_path.name}/ckpt_03"
    upload_model(uri)
    cache = tmp_path / "cache"
    dest = cache / cache_key(uri)
    dest.mkdir(parents=True)  # what a node killed mid-copy leaves: files but no .complete marker
    (dest / "config.json").write_text("{")
    (cache / f"{dest.name}.partial-99999").mkdir()
    got = fetch_folder(uri, cache, 10.0)
    assert got == dest and (dest / "config.json").read_text() == '{"model_type": "llama"}'
    assert (dest / "model.safetensors").stat().st_size == 1000


def test_the_cache_is_bounded_and_skips_entries_in_use(tmp_path):
    cache = tmp_path / "cache"
    for i, key in enumerate(["old", "held", "new"]):
        d = cache / key
        d.mkdir(parents=True)
        (d / "w").write_bytes(b"x" * 600_000)
        (d / ".complete").write_text("")
        os.utime(d / ".complete", (time.time() - 100 + i, time.time() - 100 + i))
    held = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                             "fcntl.flock(f, fcntl.LOCK_SH); print('ok', flush=True); time.sleep(60)",
                             str(cache / ".held.use")], stdout=subprocess.PIPE, text=True)
    assert held.stdout.readline().strip() == "ok"
    try:
        evicted = evict(cache, max_gib=1_000_000 / 2**30, keep="new")  # room for one entry
    finally:
        held.kill()
        held.wait()
    assert evicted == ["old"]  # "held" is in use by another process on this node; "new" was just fetched
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["held", "new"]


def test_a_missing_local_folder_names_the_node(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"does not exist on node {socket.gethostname()}.*s3://"):
        local_model(str(tmp_path / "nowhere"), ModelsConf(cache_dir=str(tmp_path)))
    assert local_model(str(tmp_path), ModelsConf()) == str(tmp_path)
    assert local_model("hf:org/name", ModelsConf()) == "org/name"
