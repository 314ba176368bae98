"""JSONL input read line by line, every bad line named `path:line` (not UTF-8, not JSON, not an object)."""
from __future__ import annotations

import json
from typing import Callable, Iterator, Optional


def records(path: str, data: Optional[bytes] = None, error: type = ValueError,
            skip: Optional[Callable[[int, str, str], None]] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path` (or of `data`, its bytes, when given). A bad
    line raises `error` naming it, or with `skip` is passed over after `skip(line, reason, detail)`
    (reasons: not_utf8, not_json, not_object) — for corpora, where one bad row must not sink the rest. A URI
    (s3://, gs://) is read whole through the run store's filesystem."""
    if data is None and "://" in path:
        from scoder_ray.store import read_bytes

        data = read_bytes(path)
    lines = data.splitlines() if data is not None else open(path, "rb")
    try:
        for n, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad("not_json", f"not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise _Bad("not_object", f"expected a JSON object, got {type(record).__name__}")
            except UnicodeDecodeError as e:
                bad = _Bad("not_utf8", f"not UTF-8 text (byte {e.start} of the line)")
            except _Bad as b:
                bad = b
            else:
                yield n, record
                continue
            if skip is None:
                raise error(f"{path}:{n}: {bad.detail}")
            skip(n, bad.reason, bad.detail)
    finally:
        if data is None:
            lines.close()


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
