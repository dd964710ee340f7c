"""ralign's own cache: what it computes once per machine (converted models, hash memos, parser tables).

Everything here is a speed-up only: a missing, unreadable or corrupt entry is recomputed, and a
cache that cannot be written costs time, never an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """`$RALIGN_CACHE`, else `~/.cache/ralign`."""
    env = os.environ.get("RALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ralign"


def read_json(name: str, pairs: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A JSON entry of the cache root, or None when it is missing, unreadable or not JSON.

    `pairs`: json's `object_pairs_hook`, to rebuild what JSON cannot say (e.g. integer keys).
    """
    try:
        text = (cache_root() / name).read_text(encoding="utf-8")
        return json.loads(text, object_pairs_hook=pairs)
    except (OSError, ValueError, RecursionError):
        return None


def write_json(name: str, data: Any) -> None:
    """Write an entry atomically (temporary file, then rename); failing to is not an error."""
    folder = cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, folder / name)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only cache only costs the next run the time to compute it again
