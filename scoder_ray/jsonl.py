"""JSONL input read line by line, every bad line named `path:line` (not UTF-8, not JSON, not an object)."""
from __future__ import annotations

import json
from typing import Iterator, Optional


def records(path: str, data: Optional[bytes] = None, error: type = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path` (or of `data`, its bytes, when given)."""
    lines = data.splitlines() if data is not None else open(path, "rb")
    try:
        for n, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            yield n, record
    finally:
        if data is None:
            lines.close()
