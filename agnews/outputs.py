"""Atomic outputs: a job writes beside its final place and renames into it when complete, so a
crash never leaves a half-written output that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq


def temp_folder_beside(out: Path) -> Path:
    """A new hidden folder next to `out` (same filesystem, so the final rename is atomic)."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Renames the finished temporary folder into place; an old `out` goes only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    """JSON to a temporary file beside `path`, then renamed over it: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parquet_rows(folder: Path) -> int:
    """Rows in a folder of Parquet files, from their footers: how jobs re-count what they wrote."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))
