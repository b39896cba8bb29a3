"""Benchmark: the preparation stage on Ray Data against a pure-Python torchtext pipeline.

    python bench/bench_prepare.py [--articles N] [--files F] [--small-articles M]
                                  [--data DIR] [--cpus C]

Builds N articles (default 1,000,000) by tiling the real rows of DIR/train.csv (default
/work/shared/data/ag_news) with a light perturbation (every copy after the first appends a
copy-and-row token to a quarter of the titles, so each copy brings new vocabulary), written as F
files in the official AG_NEWS CSV format into a temporary folder that is removed at the end.

Project side: `agnews.prepare.prepare` (read + tokenize + count + vocab + encode + Parquet write)
on a local Ray with C CPUs (default 2), timed around the whole call after a warm-up run, so Ray's
own start-up is not counted. It runs twice: on the first M articles (default 250,000, whole
files) and on all N, and the driver's peak RSS is taken for each run (the peak is reset before
each run through /proc/self/clear_refs), to show that driver memory stays flat as the corpus
grows. Ray workers and the object store are other processes, not counted.

Reference side, same process: what torchtext 0.18 does in one process: `csv.reader` (as its
AG_NEWS dataset), `basic_english` (its tokenizer, line for line), `collections.Counter`, sort by
(-count, token), and `[stoi.get(t, 1) for t in tokens]`. Tokens are computed once and kept, which
is kinder to the reference than torchtext's usual tokenize-twice recipe. It runs first, before
Ray starts, on the first M articles; its articles/s is extrapolated linearly to N (every step is
linear in the articles). The vocab of both sides on those M articles is compared
(`vocab_equal`).

CPU seconds per 1M articles are reported for both sides as well (the project's: the driver and
the Ray processes it started, from /proc): on a shared machine they move less than wall time.

Prints ONE JSON line on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from benchlib import (
    DEFAULT_DATA,
    log,
    read_source,
    reset_peak_rss,
    rss_mb,
    run_in_temp_folder,
    write_ag_news_csv,
    write_corpus,
)

SPECIALS = ("<pad>", "<unk>")
GOAL = 10.0


# --- input --------------------------------------------------------------------------------------


def tiled_rows(source: pa.Table, start: int, stop: int) -> pa.Table:
    """Articles start..stop of the tiled corpus: source row j % n, copy j // n, perturbed.

    Copy 0 is the source as it is. In copy k >= 1, the rows i with i % 4 == k % 4 get the token
    `c{k}r{i % 1009}` appended to their title: up to 1,009 new tokens per copy.
    """
    n = source.num_rows
    rows = [j % n for j in range(start, stop)]
    copies = [j // n for j in range(start, stop)]
    part = source.take(pa.array(rows, pa.int64()))
    suffix = pa.array(
        [f" c{k}r{i % 1009}" if k and i % 4 == k % 4 else "" for i, k in zip(rows, copies)],
        pa.string(),
    )
    title = pc.binary_join_element_wise(part["title"], suffix, "")
    return part.set_column(part.schema.get_field_index("title"), "title", title)


def build_corpus(source: pa.Table, articles: int, files: int, folder: Path) -> list[Path]:
    """`articles` tiled articles in `files` CSV files."""
    return write_corpus(lambda a, b: tiled_rows(source, a, b), articles, files, folder, "train")


# --- memory -------------------------------------------------------------------------------------


def tree_cpu_seconds(root: int | None = None) -> float | None:
    """CPU seconds (user + system) of a process and its live descendants, from Linux /proc.

    For the driver this covers the Ray processes it started (GCS, raylet, workers), which are
    reused from one `prepare` call to the next, so a difference measures one call.
    """
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    if root not in cpu:
        return None
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


def ru_maxrss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024, 1)


# --- project side -------------------------------------------------------------------------------


def run_project(train: list[Path], test: Path, out: Path) -> dict:
    """One `prepare` call, timed as a whole, with the driver's peak RSS during it."""
    from agnews.config import PrepareConfig
    from agnews.prepare import prepare

    before = rss_mb("VmRSS")
    peak_reset = reset_peak_rss()
    cpu = tree_cpu_seconds()
    t = time.perf_counter()
    manifest = prepare(
        {"train": [str(p) for p in train], "test": [str(test)]},
        str(out),
        PrepareConfig(val_fraction=0.0),
        fmt="ag_news",
        overwrite=True,
        log=log,
    )
    seconds = time.perf_counter() - t
    cpu_after = tree_cpu_seconds()
    return {
        "cpu_seconds": None if cpu is None or cpu_after is None else cpu_after - cpu,
        "rows_read": manifest["rows_read"],
        "seconds": seconds,
        "stage_seconds": manifest["seconds"],
        "tokens": manifest["tokens"],
        "vocab_size": manifest["vocab_size"],
        "rss_before_mb": before,
        "peak_rss_mb": rss_mb("VmHWM") if peak_reset else ru_maxrss_mb(),
        "peak_reset": peak_reset,
        "versions": manifest["versions"],
    }


# --- reference side -----------------------------------------------------------------------------


def run_reference(train: list[Path]) -> dict:
    """torchtext 0.18's pipeline in one process: csv + basic_english + Counter + sort + lookups."""
    from agnews.text import basic_english

    stages: dict[str, float] = {}
    cpu = time.process_time()
    t = time.perf_counter()
    texts: list[str] = []
    for path in train:
        with open(path, newline="", encoding="utf-8") as f:
            texts += [" ".join(row[1:]) for row in csv.reader(f)]  # torchtext's AG_NEWS rows
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    token_lists = [basic_english(text) for text in texts]
    stages["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    counter: Counter[str] = Counter()
    for tokens in token_lists:
        counter.update(tokens)
    stages["count"] = time.perf_counter() - t

    t = time.perf_counter()
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    itos = list(SPECIALS) + [token for token, _ in ranked if token not in SPECIALS]
    stoi = {token: i for i, token in enumerate(itos)}
    stages["vocab"] = time.perf_counter() - t

    t = time.perf_counter()
    ids = [[stoi.get(token, 1) for token in tokens] for tokens in token_lists]
    stages["encode"] = time.perf_counter() - t

    return {
        "articles": len(texts),
        "tokens": sum(len(i) for i in ids),
        "seconds": sum(stages.values()),
        "cpu_seconds": time.process_time() - cpu,
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "itos": itos,
    }


def _per_1m(seconds: float | None, articles: int) -> float | None:
    return None if seconds is None else seconds * 1_000_000 / articles


def _cpu_ratio(reference: dict, project: dict) -> float | None:
    if not project["cpu_seconds"]:
        return None
    per_article = project["cpu_seconds"] / project["rows_read"]
    return round(reference["cpu_seconds"] / reference["articles"] / per_article, 2)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--articles", type=int, default=1_000_000, help="articles in the full run")
    p.add_argument("--files", type=int, default=16, help="CSV files the articles are split into")
    p.add_argument(
        "--small-articles",
        type=int,
        default=250_000,
        help="the second size (memory check, reference, vocab check); rounded up to whole files",
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="folder holding train.csv and test.csv")
    p.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray")
    p.add_argument("--test-rows", type=int, default=1_000, help="rows of test.csv used as test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.articles < 1 or args.files < 1 or args.small_articles < 1:
        raise SystemExit("--articles, --files and --small-articles must be positive")
    return run_in_temp_folder("bench_prepare-", lambda work: _run(args, work))


def _run(args: argparse.Namespace, work: Path) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import logging

    import ray

    data = Path(args.data)
    t = time.perf_counter()
    source = read_source(data / "train.csv")
    corpus = work / "corpus"
    corpus.mkdir()
    train = build_corpus(source, args.articles, args.files, corpus)
    test = work / "test.csv"
    write_ag_news_csv(read_source(data / "test.csv").slice(0, args.test_rows), test)
    per_file = math.ceil(args.articles / args.files)
    small = train[: min(len(train), math.ceil(args.small_articles / per_file))]
    small_articles = min(args.articles, len(small) * per_file)
    log(
        f"corpus: {args.articles:,} articles in {len(train)} files, "
        f"{sum(p.stat().st_size for p in train) / 2**20:,.0f} MiB "
        f"({time.perf_counter() - t:.1f} s); small size {small_articles:,}"
    )

    # The reference first, in a process that has not started Ray yet (no Ray threads running).
    reference = run_reference(small)
    gc.collect()
    log(
        f"reference, {reference['articles']:,} articles: {reference['seconds']:.1f} s "
        f"({reference['cpu_seconds']:.1f} s CPU)"
    )

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        t = time.perf_counter()
        run_project([test], test, work / "warmup")
        warmup = time.perf_counter() - t
        log(f"warm-up prepare: {warmup:.1f} s")

        small_run = run_project(small, test, work / "small")
        log(f"project, {small_articles:,} articles: {small_run['seconds']:.1f} s")
        project_itos = json.loads((work / "small" / "vocab.json").read_text())["itos"]
        shutil.rmtree(work / "small")

        full_run = run_project(train, test, work / "full")
        log(f"project, {args.articles:,} articles: {full_run['seconds']:.1f} s")
        shutil.rmtree(work / "full")
    finally:
        ray.shutdown()

    project_rate = full_run["rows_read"] / full_run["seconds"]
    reference_rate = reference["articles"] / reference["seconds"]
    versions = dict(full_run["versions"])
    versions["platform"] = platform.platform()
    return {
        "bench": "prepare",
        "articles": args.articles,
        "files": len(train),
        "project_articles_per_s": round(project_rate),
        "reference_articles_per_s": round(reference_rate),
        "ratio": round(project_rate / reference_rate, 2),
        "goal": GOAL,
        "meets_goal": project_rate / reference_rate >= GOAL,
        "project_seconds": round(full_run["seconds"], 2),
        "project_rows_read": full_run["rows_read"],
        "project_cpu_seconds": _round(full_run["cpu_seconds"], 2),
        "project_stage_seconds": full_run["stage_seconds"],
        "project_small_articles_per_s": round(small_run["rows_read"] / small_run["seconds"]),
        "reference_articles": reference["articles"],
        "reference_seconds": round(reference["seconds"], 2),
        "reference_cpu_seconds": round(reference["cpu_seconds"], 2),
        "reference_stage_seconds": reference["stage_seconds"],
        "reference_extrapolated_seconds": round(args.articles / reference_rate, 1),
        "cpu_seconds_per_1m_articles": {
            "project": _round(_per_1m(full_run["cpu_seconds"], full_run["rows_read"]), 1),
            "reference": _round(_per_1m(reference["cpu_seconds"], reference["articles"]), 1),
            "note": "project: driver + the Ray processes it started; less sensitive to other "
            "jobs' load than wall time",
        },
        "cpu_ratio": _cpu_ratio(reference, full_run),
        "cpu_ratio_note": "reference CPU-s per article / project CPU-s per article: the work "
        "saved; times the cores both sides get, it bounds the wall ratio on an idle machine",
        "reference_note": (
            "csv.reader + basic_english + Counter + sort + list lookups in one process, tokens "
            "kept (tokenized once); run on the first reference_articles, rate extrapolated "
            "linearly to articles"
        ),
        "vocab_equal": reference["itos"] == project_itos,
        "vocab_size_small": len(project_itos),
        "vocab_size_full": full_run["vocab_size"],
        "tokens_full": full_run["tokens"],
        "driver_peak_rss_mb": {
            str(small_run["rows_read"]): small_run["peak_rss_mb"],
            str(full_run["rows_read"]): full_run["peak_rss_mb"],
        },
        "driver_rss_before_mb": {
            str(small_run["rows_read"]): small_run["rss_before_mb"],
            str(full_run["rows_read"]): full_run["rss_before_mb"],
        },
        "driver_peak_rss_growth_mb": {
            str(run["rows_read"]): round(run["peak_rss_mb"] - run["rss_before_mb"], 1)
            for run in (small_run, full_run)
            if run["peak_rss_mb"] is not None and run["rss_before_mb"] is not None
        },
        "driver_peak_rss_method": (
            "VmHWM of the driver, reset before each prepare call"
            if full_run["peak_reset"]
            else "ru_maxrss of the driver (lifetime peak)"
        ),
        "ray_warmup_excluded": True,
        "ray_warmup_seconds": round(warmup, 2),
        "timing_note": (
            "project: wall time of the whole prepare() call (read + tokenize + count + vocab + "
            "encode + Parquet write + manifest); rows_read includes the test rows"
        ),
        "cores": os.cpu_count(),
        "ray_num_cpus": args.cpus,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


if __name__ == "__main__":
    main()
