"""The preparation stage, on Ray Data: read -> tokenize -> count -> Vocab -> encode -> Parquet.

    read (one task per file)      every input row, bad ones with a reason
    tokenize (map_batches)        token lists, tokenised once; the split of each row
    count (map_batches + driver)  per-block token counts, summed as they stream in
    Vocab                         from the training rows only, torchtext's order
    encode (map_batches)          {id, label, ids: list<int32>, length}
    write                         OUT/{train,val,test}/, OUT/rejected/, vocab.json, manifest.json

Everything is written into a temporary folder beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from agnews import __version__
from agnews.config import PREPARED_KIND, PrepareConfig
from agnews.data import (
    AG_NEWS_ROWS,
    DEFAULT_MAX_ROW_BYTES,
    REJECTED_COLUMNS,
    ColumnMapping,
    DataError,
    file_key,
    md5_of,
    read_dataset,
    reject_where,
    reraise_data_errors,
)
from agnews.outputs import parquet_rows, publish, temp_folder_beside, write_json_atomic
from agnews.text import Vocab, count_tokens, sum_counts, tokenize

SPLITS = ("train", "val", "test")
DEFAULT_PREPARE = PrepareConfig()
ROWS_PER_FILE = 65_536


class PrepareError(RuntimeError):
    """The job refused to finish: too many bad rows, counts that do not add up, OUT exists."""


# --- functions Ray runs on workers (module level, so they ship with the package) -----------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def assign_split(
    files: pa.Array, rows: pa.Array, sources: pa.Array, val_fraction: float, seed: int
) -> pa.Array:
    """train/val by a hash of (file name, row, seed): the same rows every run; test stays test."""
    encoded = (
        pc.dictionary_encode(files).combine_chunks()
        if isinstance(files, pa.ChunkedArray)
        else pc.dictionary_encode(files)
    )
    keys = np.array([file_key(f) for f in encoded.dictionary.to_pylist()], dtype=np.uint64)
    file_part = keys[encoded.indices.to_numpy(zero_copy_only=False)] << np.uint64(32)
    with np.errstate(over="ignore"):
        h = _splitmix64(
            file_part
            ^ rows.to_numpy().astype(np.uint64)
            ^ _splitmix64(np.full(len(rows), seed, np.uint64))
        )
    is_val = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction
    source = np.asarray(sources.to_numpy(zero_copy_only=False), dtype=object)
    split = np.where(source == "train", np.where(is_val, "val", "train"), source)
    return pa.array(split, pa.string())


def tokenize_rows(batch: pa.Table, val_fraction: float, seed: int) -> pa.Table:
    """map_batches: adds `split` and `tokens`; a row left with no token is rejected here."""
    split = assign_split(batch["file"], batch["row"], batch["source"], val_fraction, seed)
    tokens = tokenize(batch["text"])
    batch = reject_where(batch, pc.equal(pc.list_value_length(tokens), 0), "no tokens in text")
    unlabelled = pc.and_(pc.is_null(batch["label"]), pc.not_equal(split, "test"))
    batch = reject_where(batch, unlabelled, "missing label")
    return (
        batch.drop_columns(["text", "source"])
        .append_column("split", split)
        .append_column("tokens", tokens)
    )


def block_counts(batch: pa.Table) -> pa.Table:
    """map_batches: token counts of the accepted training rows of one block."""
    keep = pc.and_(pc.is_null(batch["reason"]), pc.equal(batch["split"], "train"))
    return count_tokens(pc.filter(batch["tokens"], keep))


def block_stats(batch: pa.Table) -> pa.Table:
    """map_batches: rows and tokens by (split, reason) of one block."""
    summary = (
        pa.table(
            {
                "split": batch["split"],
                "reason": pc.fill_null(batch["reason"], ""),
                "file": batch["file"],
                "tokens": pc.fill_null(pc.list_value_length(batch["tokens"]), 0).cast(pa.int64()),
            }
        )
        .group_by(["split", "reason", "file"])
        .aggregate([("tokens", "count"), ("tokens", "sum")])
    )
    return summary.rename_columns(["split", "reason", "file", "rows", "tokens"])


def encode_rows(batch: pa.Table, itos: list[str], max_len: int | None) -> pa.Table:
    """map_batches: the accepted rows' token ids."""
    vocab = _vocab_for(tuple(itos))
    ids = vocab.encode(batch["tokens"], max_len)
    return pa.table(
        {
            "id": batch["id"],
            "label": batch["label"],
            "ids": ids,
            "length": pc.list_value_length(ids).cast(pa.int32()),
            "split": batch["split"],
        }
    )


_VOCAB_CACHE: dict[int, Vocab] = {}


def _vocab_for(itos: tuple[str, ...]) -> Vocab:
    # One Vocab (and its Arrow value set) per worker process, not one per batch.
    key = hash(itos)
    if key not in _VOCAB_CACHE:
        _VOCAB_CACHE.clear()
        _VOCAB_CACHE[key] = Vocab(itos, (0,) * len(itos))
    return _VOCAB_CACHE[key]


# --- the job -----------------------------------------------------------------------------------


def prepare_ag_news(
    data_dir: str, out: str, config: PrepareConfig = DEFAULT_PREPARE, **kwargs
) -> dict:
    """`agnews prepare`: an AG_NEWS folder (train.csv, test.csv) -> prepared OUT."""
    from agnews.data import ag_news_files

    files = ag_news_files(data_dir)
    return prepare(
        {"train": [files["train"]], "test": [files["test"]]}, out, config, fmt="ag_news", **kwargs
    )


def prepare(
    sources: dict[str, list[str]],
    out: str,
    config: PrepareConfig = DEFAULT_PREPARE,
    *,
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    overwrite: bool = False,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    log=print,
) -> dict:
    """Prepares {"train": paths, "test": paths} into OUT; returns the manifest.

    Any number of rows is accepted; a source with other row counts than the official AG_NEWS
    files is noted in the manifest. Raises PrepareError above `max_rejected_fraction` bad rows.
    """

    from agnews.data import expand_paths
    from agnews.runtime import quiet_data

    quiet_data()
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {config.val_fraction}")
    out_path = Path(out).expanduser().absolute()
    if out_path.exists() and not overwrite:
        raise PrepareError(f"{out_path} exists; pass --overwrite to replace it")
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    items = [
        {"path": path, "name": name, "source": source}
        for source, paths in sources.items()
        for path, name in expand_paths(paths)
    ]
    tmp = temp_folder_beside(out_path)
    try:
        t = time.perf_counter()
        rows = read_dataset(items, fmt, mapping, max_row_bytes=max_row_bytes)
        with reraise_data_errors():
            tokenized = rows.map_batches(
                tokenize_rows,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"val_fraction": config.val_fraction, "seed": config.seed},
            ).materialize()
        seconds["read_tokenize"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = _collect(
            tokenized.map_batches(block_stats, batch_size=None, batch_format="pyarrow")
        )
        stats = stats.group_by(["split", "reason", "file"]).aggregate(
            [("rows", "sum"), ("tokens", "sum")]
        )
        stats = stats.rename_columns(["split", "reason", "file", "rows", "tokens"])
        summary = _summarise(stats)
        _check_rejected(summary, config.max_rejected_fraction, tokenized)
        seconds["stats"] = time.perf_counter() - t

        t = time.perf_counter()
        counts = _sum_streamed(
            tokenized.map_batches(block_counts, batch_size=None, batch_format="pyarrow")
        )
        vocab = Vocab.from_counts(counts, min_freq=config.min_freq, max_size=config.max_size)
        vocab.save(tmp / "vocab.json")
        seconds["vocab"] = time.perf_counter() - t
        log(f"vocab: {len(vocab):,} tokens from {summary['tokens']['train']:,} training tokens")

        t = time.perf_counter()
        encoded = (
            tokenized.map_batches(_accepted_only, batch_size=None, batch_format="pyarrow")
            .map_batches(
                encode_rows,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"itos": list(vocab.itos), "max_len": config.max_len},
            )
            .materialize()
        )
        for split in SPLITS:
            part = encoded.map_batches(
                _only_split, batch_size=None, batch_format="pyarrow", fn_kwargs={"split": split}
            )
            _write_parquet(part, tmp / split, summary["accepted"][split])
        rejected = tokenized.map_batches(_rejected_only, batch_size=None, batch_format="pyarrow")
        _write_parquet(rejected, tmp / "rejected", summary["rejected"])
        seconds["encode_write"] = time.perf_counter() - t

        written = {name: parquet_rows(tmp / name) for name in (*SPLITS, "rejected")}
        _check_accounting(summary, written)
        seconds["total"] = time.perf_counter() - started
        manifest = _manifest(
            sources, items, config, vocab, summary, written, seconds, max_row_bytes
        )
        write_json_atomic(tmp / "manifest.json", manifest)
        publish(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"prepared {out_path}: "
        + ", ".join(f"{s} {written[s]:,}" for s in SPLITS)
        + f", rejected {written['rejected']:,} of {summary['rows_read']:,} rows read"
        + f" ({seconds['total']:.1f} s)"
    )
    return manifest


def _accepted_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"]))


def _rejected_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"])).select(["id", *REJECTED_COLUMNS, "split"])


def _only_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split)).drop_columns(["split"])


def _collect(ds) -> pa.Table:
    """A small per-block summary, gathered on the driver (a few rows per block)."""
    tables = [
        pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    return pa.concat_tables(tables) if tables else pa.table({})


def _sum_streamed(ds, flush_rows: int = 2_000_000) -> pa.Table:
    """Sums per-block counts as they arrive: driver memory grows with the vocab, not the corpus."""
    total = sum_counts([])
    pending: list[pa.Table] = []
    pending_rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= flush_rows:
            total, pending, pending_rows = sum_counts([total, *pending]), [], 0
    return sum_counts([total, *pending])


def _write_parquet(ds, folder: Path, rows: int) -> None:
    """Writes `ds` into `folder`; an empty split gets its folder and no Ray pass."""
    folder.mkdir(parents=True, exist_ok=True)
    if rows:
        ds.write_parquet(str(folder), min_rows_per_file=ROWS_PER_FILE)


def _summarise(stats: pa.Table) -> dict:
    rows = stats.to_pylist()
    accepted = {s: 0 for s in SPLITS}
    tokens = {s: 0 for s in SPLITS}
    rejected_by_reason: dict[str, int] = {}
    rejected_by_file: dict[str, int] = {}
    for r in rows:
        if r["reason"]:
            kind = r["reason"].split(" (")[0].split(":")[0]
            rejected_by_reason[kind] = rejected_by_reason.get(kind, 0) + r["rows"]
            rejected_by_file[r["file"]] = rejected_by_file.get(r["file"], 0) + r["rows"]
        else:
            accepted[r["split"]] += r["rows"]
            tokens[r["split"]] += r["tokens"]
    rejected = sum(rejected_by_reason.values())
    return {
        "rows_read": sum(accepted.values()) + rejected,
        "accepted": accepted,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
        "rejected_by_file": rejected_by_file,
        "tokens": tokens,
    }


def _check_rejected(summary: dict, max_fraction: float, tokenized) -> None:
    read, rejected = summary["rows_read"], summary["rejected"]
    if read == 0:
        raise PrepareError("no rows read: the input files are empty")
    if rejected / read <= max_fraction:
        return
    first = tokenized.map_batches(_rejected_only, batch_size=None, batch_format="pyarrow").take(5)
    files = ", ".join(f"{f} ({n:,})" for f, n in summary["rejected_by_file"].items())
    shown = "\n".join(f"  {r['file']}, row {r['row']}: {r['reason']}" for r in first)
    raise PrepareError(
        f"{rejected:,} of {read:,} rows rejected ({rejected / read:.1%} > "
        f"--max-rejected-fraction {max_fraction:g}) in {files}. First bad rows:\n{shown}"
    )


def _check_accounting(summary: dict, written: dict) -> None:
    """rows read == accepted + rejected, counted again from the files written."""
    for split in SPLITS:
        if written[split] != summary["accepted"][split]:
            raise PrepareError(
                f"{split}: wrote {written[split]:,} rows, expected {summary['accepted'][split]:,}"
            )
    total = sum(written.values())
    if total != summary["rows_read"] or written["rejected"] != summary["rejected"]:
        raise PrepareError(
            f"rows read {summary['rows_read']:,} != written {total:,} "
            f"(accepted {total - written['rejected']:,} + rejected {written['rejected']:,})"
        )


def _manifest(sources, items, config, vocab, summary, written, seconds, max_row_bytes) -> dict:
    import ray
    import torch

    files = []
    for item in items:
        entry = {"path": item["path"], "name": item["name"], "source": item["source"]}
        if "://" not in item["path"] and os.path.getsize(item["path"]) < 2**31:
            entry["md5"] = md5_of(item["path"])
        files.append(entry)
    accepted = summary["accepted"]
    by_source = {"train": accepted["train"] + accepted["val"], "test": accepted["test"]}
    notes = [
        f"{source}: {by_source[source]:,} rows accepted; "
        f"the official AG_NEWS {source} set has {official:,}"
        for source, official in AG_NEWS_ROWS.items()
        if source in sources and by_source[source] != official
    ]
    return {
        "kind": PREPARED_KIND,
        "version": 1,
        "agnews_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(config),
        "max_len": config.max_len,
        "max_row_bytes": max_row_bytes,
        "seed": config.seed,
        "files": files,
        "rows_read": summary["rows_read"],
        "splits": {s: {"rows": written[s], "tokens": summary["tokens"][s]} for s in SPLITS},
        "rejected": {
            "rows": written["rejected"],
            "by_reason": summary["rejected_by_reason"],
            "by_file": summary["rejected_by_file"],
        },
        "tokens": sum(summary["tokens"].values()),
        "vocab_size": len(vocab),
        "tokenizer": "basic_english",
        "notes": notes,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "pyarrow": pa.__version__,
            "torch": torch.__version__,
        },
    }


def load_manifest(prepared: str | os.PathLike) -> dict:
    """The manifest of a prepared folder, refusing a folder that is not one."""
    path = Path(prepared) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{prepared}: not a prepared folder (no manifest.json); run `agnews prepare`"
        ) from None
    if manifest.get("kind") != PREPARED_KIND:
        raise DataError(f"{path}: not an agnews prepared manifest")
    return manifest
