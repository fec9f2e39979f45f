"""JSON Lines files (corpora, tasks, calibration sets, logs): one reader, so a bad line is reported the same way
everywhere, by its file and line number. Plain Python."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line; a line that is not JSON raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str) -> list[Any]:
    return [record for _, record in iter_jsonl(path)]
