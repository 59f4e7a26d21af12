"""JSON Lines input, one object per line: the one reader behind every JSONL file a user hands nanoseek (corpora,
chat data, task and multiple-choice files), so that all of them fail the same way, naming file and line."""
from __future__ import annotations

import json
from collections.abc import Iterator


def read_jsonl(path: str, what: str = "JSONL file") -> Iterator[tuple[str, dict]]:
    """Yields ("path:line", object) for each non-blank line. FileNotFoundError "<what> not found: path";
    ValueError naming path:line for a line that is not a JSON object, or naming the file when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{i}", row
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
