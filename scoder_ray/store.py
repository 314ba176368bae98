"""The run directory is the state: one folder per stage, written atomically, with a `_DONE.json`.

    <root>/<run_id>/config.yaml            resolved config (older versions kept as config.<n>.yaml)
    <root>/<run_id>/<stage>/...            the stage's output (Parquet files or a model folder)
    <root>/<run_id>/<stage>/_DONE.json     written last: key, counts, timings, input and config digests

A stage writes into `<stage>.tmp-<token>/`, which is renamed to `<stage>/` when complete; `_DONE.json`
is written after the rename, so a folder without it never counts (on object stores, where a rename is a
copy, the marker written last is what makes it safe). A rerun skips a stage whose `_DONE.json` key —
a digest of its config section and its inputs' digests — matches, and redoes it otherwise.
`root` is a local path or any pyarrow filesystem URI (s3://, gs://); the code path is the same.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow.fs as pafs

from scoder_ray.config import Config, config_from_dict, digest, to_yaml

DONE = "_DONE.json"
TMP_MARK = ".tmp-"


@dataclass
class StageState:
    name: str
    state: str  # done | stale | partial | missing
    done: Optional[dict[str, Any]] = None


class RunStore:
    def __init__(self, root: str, run_id: str):
        self.fs, base = filesystem(root)
        self._prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
        self.base = f"{base.rstrip('/')}/{run_id}"
        self.fs.create_dir(self.base, recursive=True)

    @classmethod
    def for_config(cls, cfg: Config) -> "RunStore":
        return cls(cfg.run.root, cfg.run.id)

    @classmethod
    def open(cls, run_dir: str) -> "RunStore":
        """A store for an existing run directory (`scoder-ray status RUN_DIR`)."""
        root, run_id = run_dir.rstrip("/").rsplit("/", 1) if "/" in run_dir.rstrip("/") else (".", run_dir)
        return cls(root, run_id)

    # -- paths ------------------------------------------------------------------------------------
    def path(self, stage: str) -> str:
        """Filesystem path of a stage folder (for pyarrow; no scheme)."""
        return f"{self.base}/{stage}"

    def uri(self, stage: str) -> str:
        """Full URI of a stage folder, for Ray Data readers and writers."""
        return self._prefix + self.path(stage)

    # -- config -----------------------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        """Write config.yaml once; if a rerun brings a different config, keep the old as config.<n>.yaml."""
        text = to_yaml(cfg)
        path = f"{self.base}/config.yaml"
        old = self._read_text(path)
        if old == text:
            return
        if old is not None:
            n = 1
            while self._exists(f"{self.base}/config.{n}.yaml"):
                n += 1
            self.fs.move(path, f"{self.base}/config.{n}.yaml")
        self._write_text_atomic(path, text)

    def read_config(self) -> Optional[Config]:
        import yaml

        text = self._read_text(f"{self.base}/config.yaml")
        return None if text is None else config_from_dict(yaml.safe_load(text))

    # -- stages -----------------------------------------------------------------------------------
    def read_done(self, stage: str) -> Optional[dict[str, Any]]:
        text = self._read_text(f"{self.path(stage)}/{DONE}")
        return None if text is None else json.loads(text)

    def stage_key(self, config_sections: dict[str, Any], inputs: dict[str, str]) -> str:
        return digest({"config": {k: digest(v) for k, v in config_sections.items()}, "inputs": inputs})

    def state(self, stage: str, key: Optional[str] = None) -> StageState:
        done = self.read_done(stage)
        if done is not None:
            return StageState(stage, "done" if key is None or done["key"] == key else "stale", done)
        partial = self._exists(self.path(stage)) or bool(self._tmp_dirs(stage))
        return StageState(stage, "partial" if partial else "missing")

    def run_stage(
        self,
        stage: str,
        config_sections: dict[str, Any],
        inputs: dict[str, str],
        produce: Callable[[str], dict[str, Any]],
        force: bool = False,
    ) -> dict[str, Any]:
        """Run `produce(tmp_uri) -> summary` unless the stage is already done with the same key.

        `summary` must hold `rows` (the output's row count); everything in it lands in `_DONE.json`.
        Returns the `_DONE.json` content (the old one when skipped).
        """
        key = self.stage_key(config_sections, inputs)
        current = self.state(stage, key)
        if current.state == "done" and not force:
            return {**current.done, "skipped": True}  # type: ignore[dict-item]
        for tmp in self._tmp_dirs(stage):  # leftovers of an interrupted attempt
            self.fs.delete_dir(tmp)
        tmp = f"{self.path(stage)}{TMP_MARK}{secrets.token_hex(4)}"
        self.fs.create_dir(tmp, recursive=True)
        started = time.time()
        summary = produce(self._prefix + tmp)
        if "rows" not in summary:
            raise ValueError(f"stage {stage!r} returned no row count")
        final = self.path(stage)
        if self._exists(final):  # stale: drop the marker first so a crash below leaves nothing that counts
            if self._exists(f"{final}/{DONE}"):
                self.fs.delete_file(f"{final}/{DONE}")
            self.fs.delete_dir(final)
        self.fs.move(tmp, final)
        done = {
            "stage": stage,
            "key": key,
            "config_digests": {k: digest(v) for k, v in config_sections.items()},
            "inputs": inputs,
            "output_digest": digest({"key": key, "rows": summary["rows"]}),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
            **summary,
        }
        self._write_text_atomic(f"{final}/{DONE}", json.dumps(done, indent=2, sort_keys=True, default=str))
        return done

    def stages(self) -> list[StageState]:
        """Every stage folder under the run, finished or not, in path order."""
        names: set[str] = set()
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(self.base) + 1:]
            if info.type == pafs.FileType.File and rel.endswith("/" + DONE):
                names.add(rel[: -len(DONE) - 1])
            elif info.type == pafs.FileType.Directory and TMP_MARK in rel.rsplit("/", 1)[-1]:
                names.add(rel.split(TMP_MARK, 1)[0])
        return [self.state(n) for n in sorted(names)]

    def stale_sections(self, state: StageState, cfg: Config) -> list[str]:
        """The config sections whose current digest differs from the one the stage was built with."""
        if not state.done:
            return []
        return [k for k, d in state.done.get("config_digests", {}).items() if digest(_select(cfg, k)) != d]

    # -- small file helpers -----------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _tmp_dirs(self, stage: str) -> list[str]:
        parent, name = self.path(stage).rsplit("/", 1)
        selector = pafs.FileSelector(parent, allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.Directory and i.base_name.startswith(name + TMP_MARK)]

    def _read_text(self, path: str) -> Optional[str]:
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def _write_text_atomic(self, path: str, text: str) -> None:
        tmp = f"{path}{TMP_MARK}{secrets.token_hex(4)}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a local path or a URI such as s3://bucket/key."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def write_table(uri: str, table) -> None:
    """One Parquet file at `uri` (a path ending in .parquet)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _select(cfg: Config, dotted: str) -> Any:
    """`run.seed` -> cfg.run.seed; None where the key no longer exists."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node
