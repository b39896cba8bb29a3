"""What the benchmarks share: the data folder, logging to stderr, the AG_NEWS reader, memory.

Benchmarks run as scripts (`python bench/bench_x.py`), so this folder is on sys.path.
"""

import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

# Real AG_NEWS rows for benchmarks; never copied into the repository.
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def read_source(path: Path) -> pa.Table:
    """The AG_NEWS CSV as a table of strings {label, title, description}."""
    names = ["label", "title", "description"]
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False
        ),
    )


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmHWM") -> float | None:
    """VmHWM (peak RSS since the last reset) or VmRSS of this process, in MiB."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 1024, 1)
    return None


def run_in_temp_folder(prefix: str, run: Callable[[Path], dict]) -> dict:
    """Runs a benchmark in a temporary folder (removed after), prints its one JSON line."""
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    return result


def write_ag_news_csv(table: pa.Table, path: Path) -> None:
    """The official layout: no header, every field quoted, quotes doubled."""
    pacsv.write_csv(
        table, path, pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
    )


def write_corpus(
    rows_of: Callable[[int, int], pa.Table], articles: int, files: int, folder: Path, name: str
) -> list[Path]:
    """Articles 0..articles (`rows_of(start, stop)`) as `files` equal official-format CSV files,
    the last one taking the remainder, so Ray reads them in parallel."""
    per_file = math.ceil(articles / files)
    paths = []
    for f in range(files):
        start, stop = f * per_file, min((f + 1) * per_file, articles)
        if start >= stop:
            break
        path = folder / f"{name}-{f:03d}.csv"
        write_ag_news_csv(rows_of(start, stop), path)
        paths.append(path)
    return paths
