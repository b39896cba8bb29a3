"""Where articles come from: the AG_NEWS source, and readers for news archives.

Every reader turns one file into one Arrow table in the same shape, ``ROW_SCHEMA``: one row per
input row, accepted or not. A row that cannot be used keeps its place, with `reason` saying why
and the raw bytes kept, so a later stage can send it to rejected/ and lose nothing.

torchtext 0.18's AG_NEWS dataset is reproduced here (its URLs, MD5s and row counts), since its
datasets need torchdata's removed datapipes and its C++ library does not load on current torch.
"""

from __future__ import annotations

import contextlib
import csv as pycsv
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

# torchtext/datasets/ag_news.py, 0.18.
AG_NEWS_URLS = {
    "train": "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/train.csv",
    "test": "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/test.csv",
}
AG_NEWS_MD5 = {
    "train": "b1a00f826fdfbd249f79597b59e1dc12",
    "test": "d52ea96a97a2d943681189a97654912d",
}
AG_NEWS_ROWS = {"train": 120000, "test": 7600}
DEFAULT_CACHE = Path(os.environ.get("AGNEWS_CACHE", Path.home() / ".cache" / "agnews"))

FORMATS = ("auto", "ag_news", "csv", "tsv", "jsonl", "parquet")
LABEL_FORMATS = ("auto", "index0", "index1", "name")
DEFAULT_MAX_ROW_BYTES = 512 * 1024

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int8()),
        ("text", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),  # null when the row is usable
        ("raw", pa.binary()),  # the row's raw bytes, kept for rejected rows only
    ]
)
REJECTED_COLUMNS = ["file", "row", "reason", "raw"]

_LABEL_ALIASES = {
    "world": 0,
    "sports": 1,
    "sport": 1,
    "business": 2,
    "sci/tech": 3,
    "sci_tech": 3,
    "sci-tech": 3,
    "scitech": 3,
    "science/technology": 3,
}


class DataError(ValueError):
    """Input that cannot be read at all: a missing file or column, an unknown format."""


# --- the AG_NEWS source --------------------------------------------------------------------


def md5_of(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_ag_news(root: str | os.PathLike = DEFAULT_CACHE, splits=("train", "test")) -> Path:
    """Fetches AG_NEWS into `root/ag_news/` (MD5-checked, written atomically); returns the folder.

    A file already there with the right MD5 is not fetched again.
    """
    folder = Path(root).expanduser() / "ag_news"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        target = folder / f"{split}.csv"
        if target.exists() and md5_of(target) == AG_NEWS_MD5[split]:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{split}.", suffix=".part")
        os.close(fd)
        try:
            try:
                urllib.request.urlretrieve(AG_NEWS_URLS[split], tmp)
            except (urllib.error.URLError, OSError) as e:
                raise DataError(
                    f"Cannot download AG_NEWS {split}.csv from {AG_NEWS_URLS[split]} ({e}). "
                    "Offline? Pass --data DIR, a folder holding train.csv and test.csv "
                    "in the official AG_NEWS format."
                ) from None
            got = md5_of(tmp)
            if got != AG_NEWS_MD5[split]:
                raise DataError(
                    f"Downloaded {split}.csv has MD5 {got}, expected {AG_NEWS_MD5[split]}; "
                    "not kept. Try again, or pass --data DIR."
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return folder


def ag_news_files(data_dir: str | os.PathLike, splits=("train", "test")) -> dict[str, str]:
    """The split files of an AG_NEWS folder (local or a URI), checked to exist."""
    data_dir = str(data_dir).rstrip("/")
    fs, base = pafs.FileSystem.from_uri(_as_uri(data_dir))
    files = {}
    for split in splits:
        path = f"{base}/{split}.csv"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise DataError(
                f"{data_dir}: no {split}.csv here. --data wants a folder holding train.csv and "
                "test.csv in the official AG_NEWS format (no header; quoted label 1-4, title, "
                "description)."
            )
        files[split] = f"{data_dir}/{split}.csv"
    return files


# --- archives ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of an archive hold what. Text is `text`, or `title` + " " + `description`."""

    text: str | None = None
    title: str | None = None
    description: str | None = None
    label: str | None = None
    label_format: str = "auto"  # auto: 1-4 or class names; index0: 0-3; index1: 1-4; name
    id: str | None = None
    # Source columns carried through as text, after the ROW_SCHEMA columns (predict --keep-columns).
    keep: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "keep", tuple(self.keep))
        clash = [c for c in self.keep if c in ROW_SCHEMA.names or c == "source"]
        if clash:
            raise DataError(f"cannot keep column(s) {clash}: the reader uses these names")
        if self.label_format not in LABEL_FORMATS:
            raise DataError(f"label format {self.label_format!r} is not one of {LABEL_FORMATS}")
        if self.text is None and self.title is None and self.description is None:
            raise DataError("say which column holds the text: text, or title and description")

    def used(self) -> list[str]:
        cols = [self.text, self.title, self.description, self.label, self.id, *self.keep]
        return [c for c in cols if c is not None]


def row_schema(keep: tuple[str, ...] = ()) -> pa.Schema:
    """ROW_SCHEMA, plus the kept source columns (as text) after it."""
    return pa.schema([*ROW_SCHEMA, *(pa.field(c, pa.string()) for c in keep)])


AG_NEWS_MAPPING = ColumnMapping(
    title="title", description="description", label="label", label_format="index1"
)
DEFAULT_MAPPING = ColumnMapping(text="text", label=None)


def _as_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _split_uri(path: str) -> tuple[str, str]:
    """("s3://", "bucket/key") for a URI; ("", "/abs/path") for a local path."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return scheme + "://", rest
    return "", os.path.abspath(os.path.expanduser(path))


def expand_paths(paths: list[str] | tuple[str, ...] | str) -> list[tuple[str, str]]:
    """(path, name) of each file named by paths, folders (recursively, sorted) or globs.

    Local paths or URIs. `name` is the path relative to the folder or glob root it came from
    (the base name for a file): it appears in ids and in rejected/. Hidden files and files
    starting with "_" (like _SUCCESS) inside folders are skipped.
    """
    if isinstance(paths, str):
        paths = [paths]
    files: list[tuple[str, str]] = []
    for path in map(str, paths):
        prefix, rest = _split_uri(path)
        is_glob = any(ch in rest for ch in "*?[")
        root = rest
        if is_glob:
            root = rest[: min(rest.find(ch) for ch in "*?[" if ch in rest)].rsplit("/", 1)[0]
        fs, _ = pafs.FileSystem.from_uri(prefix + root if prefix else (root or "/"))
        info = fs.get_file_info(root)
        if not is_glob and info.type == pafs.FileType.File:
            files.append((prefix + rest, rest.rsplit("/", 1)[-1]))
            continue
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{path}: no such file or folder")
        selector = pafs.FileSelector(root, recursive=True)
        found = sorted(
            i.path
            for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File
            and not _hidden(i.path[len(root) :])
            and (not is_glob or _glob_match(i.path, rest))
        )
        if not found:
            raise DataError(
                f"{path}: " + ("no file matches" if is_glob else "this folder holds no file")
            )
        files += [(prefix + f, f[len(root) :].lstrip("/")) for f in found]
    return files


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style: `*` and `?` stay within one folder, `**` crosses folders."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, path) is not None


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def detect_format(path: str, head: bytes) -> str:
    """The format of one file from its name, and from its first bytes for .csv."""
    lower = path.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    if lower.endswith(".parquet") or lower.endswith(".pq"):
        return "parquet"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith(".tsv"):
        return "tsv"
    if lower.endswith(".csv") or lower.endswith(".txt"):
        # The official AG_NEWS layout has no header: its first field is a quoted class number.
        first = head.split(b"\n", 1)[0]
        if first[:5] in (b'"1","', b'"2","', b'"3","', b'"4","'):
            return "ag_news"
        return "csv"
    raise DataError(f"{path}: cannot tell the format from the name; pass --format")


def file_key(path: str) -> int:
    """A stable 32-bit number for a file name, used in ids and the validation split."""
    return zlib.crc32(path.rsplit("/", 1)[-1].encode())


def read_rows(
    path: str,
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    *,
    name: str | None = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> pa.Table:
    """One file as a ROW_SCHEMA table: one row per input row, bad rows with a reason.

    `name` is how the file appears in ids and in rejected/ (default: its base name). Row
    numbers are 1-based line numbers in text files (the header is line 1) and record numbers
    in Parquet. Raises DataError for a file that cannot be read at all or lacks a column.
    """
    name = name or path.rsplit("/", 1)[-1]
    fs, fpath = pafs.FileSystem.from_uri(_as_uri(path))
    try:
        with fs.open_input_stream(fpath, compression="detect") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if fmt == "auto":
        fmt = detect_format(path, data[:4096])
    official = fmt == "ag_news" or mapping is AG_NEWS_MAPPING
    if fmt == "ag_news":
        keep = mapping.keep if mapping is not None else ()
        mapping = replace(AG_NEWS_MAPPING, keep=keep) if keep else AG_NEWS_MAPPING
        raw, rows, bad = _parse_csv(
            data, path, header=False, names=["label", "title", "description"]
        )
    elif fmt in ("csv", "tsv"):
        raw, rows, bad = _parse_csv(
            data, path, header=True, delimiter="\t" if fmt == "tsv" else ","
        )
    elif fmt == "jsonl":
        raw, rows, bad = _parse_jsonl(data, path)
    elif fmt == "parquet":
        raw = pq.read_table(io.BytesIO(data))
        rows, bad = np.arange(1, raw.num_rows + 1, dtype=np.int64), []
    else:
        raise DataError(f"{path}: unknown format {fmt!r}; one of {FORMATS}")
    mapping = mapping or DEFAULT_MAPPING
    missing = [c for c in mapping.used() if c not in raw.column_names]
    if missing and (raw.num_rows or fmt == "parquet"):
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(raw.column_names) or '(none)'}"
        )
    good = _normalise(raw, rows, mapping, name, max_row_bytes, official) if not missing else None
    bad_table = _bad_rows_table(bad, name, mapping.keep)
    tables = [t for t in (good, bad_table) if t is not None and t.num_rows]
    if not tables:
        return row_schema(mapping.keep).empty_table()
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table["row"])) if bad_table.num_rows else table


def _parse_csv(data: bytes, path: str, *, header: bool, names=None, delimiter=","):
    """CSV bytes -> (binary columns, line number of each row, [(line, reason, raw)])."""
    first_line = 1
    if header:
        head_end = data.find(b"\n")
        head_line = data[: head_end if head_end >= 0 else len(data)].decode("utf-8", "replace")
        names = next(pycsv.reader([head_line.rstrip("\r")], delimiter=delimiter), [])
        if not names:
            raise DataError(f"{path}: empty file, no header row")
        data = data[head_end + 1 :] if head_end >= 0 else b""
        first_line = 2
    expected = len(names)

    invalid: list[tuple[int, int, str]] = []

    def on_invalid(row) -> str:
        # row.number counts records (1-based), bad ones included, not physical lines.
        invalid.append((row.number, row.actual_columns, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                column_names=names,
                use_threads=False,
                block_size=max(1 << 20, min(len(data) + 1, 1 << 30)),
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                invalid_row_handler=on_invalid,
                ignore_empty_lines=False,
                newlines_in_values=header,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse as CSV: {e}") from None
    # Each record starts on the line after the previous one ends; quoted newlines add lines.
    is_bad = np.zeros(table.num_rows + len(invalid), dtype=bool)
    is_bad[[number - 1 for number, _, _ in invalid]] = True
    span = np.ones(len(is_bad), dtype=np.int64)
    if header:
        good_span = np.ones(table.num_rows, dtype=np.int64)
        for col in table.columns:
            good_span += pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy()
        span[~is_bad] = good_span
        span[is_bad] = [text.count("\n") + 1 for _, _, text in invalid]
    starts = first_line + np.concatenate([[0], np.cumsum(span)[:-1]]).astype(np.int64)
    bad = [
        (int(line), f"malformed CSV: expected {expected} fields, found {found}", text.encode())
        for line, (_, found, text) in zip(starts[is_bad], invalid, strict=True)
    ]
    rows = starts[~is_bad]
    if not header:
        table, rows, bad = _check_official_quoting(data, table, rows, bad)
    return table, rows, bad


# The official layout quotes every field and doubles the quotes inside; the CSV parser takes a
# stray quote silently, so each line is held to the layout.
_OFFICIAL_LINE = r'^"(?:[^"]|"")*","(?:[^"]|"")*","(?:[^"]|"")*"\r?$'


def _check_official_quoting(data: bytes, table: pa.Table, rows: np.ndarray, bad: list):
    lines = pc.list_flatten(pc.split_pattern(pa.array([data], pa.binary()), "\n"))
    line_of_row = lines.take(pa.array(rows - 1))
    ok = pc.or_(
        pc.match_substring_regex(line_of_row, _OFFICIAL_LINE),
        pc.equal(pc.binary_length(line_of_row), 0),  # an empty line is reported as empty text
    ).to_numpy(zero_copy_only=False)
    if ok.all():
        return table, rows, bad
    why = "malformed CSV: broken quoting (every field quoted, quotes inside doubled)"
    bad = sorted(bad + [(int(r), why, lines[int(r) - 1].as_py()) for r in rows[~ok]])
    return table.filter(pa.array(ok)), rows[ok], bad


def _parse_jsonl(data: bytes, path: str):
    """JSON lines -> (columns, line numbers, bad lines). Fast path unless a line is bad."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if b"" not in lines and b"\r" not in data:
        try:
            table = pajson.read_json(
                io.BytesIO(data),
                read_options=pajson.ReadOptions(
                    block_size=max(1 << 20, min(len(data) + 1, 1 << 30))
                ),
            )
            if table.num_rows == len(lines):
                return table, np.arange(1, table.num_rows + 1, dtype=np.int64), []
        except pa.ArrowInvalid:
            pass
    records, rows, bad = [], [], []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r")
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except UnicodeDecodeError:
            bad.append((number, "invalid UTF-8", line))
            continue
        except ValueError as e:
            bad.append((number, f"malformed JSON: {str(e)[:200]}", line))
            continue
        # Strings throughout: one odd value must not fail the whole file's type inference.
        records.append({k: _as_string(v) for k, v in record.items()})
        rows.append(number)
    table = pa.Table.from_pylist(records) if records else pa.table({})
    return table, np.asarray(rows, dtype=np.int64), bad


def _as_string(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _to_text(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A column as strings, and a mask of rows whose bytes are not valid UTF-8 (those -> null)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_string(col.type):
        return col, np.zeros(len(col), dtype=bool)
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    try:
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        values = col.to_pylist()
        invalid = np.zeros(len(values), dtype=bool)
        decoded = []
        for i, v in enumerate(values):
            try:
                decoded.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                invalid[i] = True
                decoded.append(None)
        return pa.array(decoded, pa.string()), invalid


def parse_labels(values: pa.Array, label_format: str) -> tuple[pa.Array, np.ndarray]:
    """Labels 0..3 (int8, null where empty), and a mask of values that are not a known label."""
    text = pc.utf8_trim_whitespace(values.cast(pa.string()))
    empty = pc.fill_null(pc.equal(pc.binary_length(text), 0), True)
    text = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    if label_format == "index0":
        label = pc.index_in(text, value_set=pa.array(["0", "1", "2", "3"]))
    elif label_format == "index1":
        label = pc.index_in(text, value_set=pa.array(["1", "2", "3", "4"]))
    else:
        by_index = pc.index_in(text, value_set=pa.array(["1", "2", "3", "4"]))
        names = list(_LABEL_ALIASES)
        by_name = pc.take(
            pa.array(list(_LABEL_ALIASES.values()), pa.int32()),
            pc.index_in(pc.utf8_lower(text), value_set=pa.array(names)),
        )
        label = by_name if label_format == "name" else pc.coalesce(by_index, by_name)
    unknown = pc.and_(pc.is_null(label), pc.invert(empty)).to_numpy(zero_copy_only=False)
    return label.cast(pa.int8()), unknown


def _normalise(
    raw: pa.Table,
    rows: np.ndarray,
    mapping: ColumnMapping,
    name: str,
    max_row_bytes: int,
    official: bool = False,
):
    n = raw.num_rows
    reason = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, why) -> None:
        mask = mask & (reason == None)  # noqa: E711 - elementwise on an object array
        reason[mask] = why if isinstance(why, str) else why[mask]

    size = np.zeros(n, dtype=np.int64)
    for col in raw.columns:
        if pa.types.is_binary(col.type) or pa.types.is_string(col.type):
            size += pc.fill_null(pc.binary_length(col), 0).to_numpy()
    too_large = size > max_row_bytes
    if too_large.any():  # the message is built only for the rows that need it
        why = np.full(len(size), None, dtype=object)
        limit = f"{max_row_bytes:,}"
        why[too_large] = [f"row too large ({n:,} bytes > {limit})" for n in size[too_large]]
        flag(too_large, why)

    def text_of(col_name: str | None) -> pa.Array | None:
        if col_name is None:
            return None
        values, invalid = _to_text(raw[col_name])
        flag(invalid, f"invalid UTF-8 in column {col_name!r}")
        return values

    if mapping.text is not None:
        text = text_of(mapping.text)
    else:
        title, description = text_of(mapping.title), text_of(mapping.description)
        if title is None or description is None:
            text = title if title is not None else description
        elif official:
            text = pc.binary_join_element_wise(title, description, " ")  # torchtext's convention
        else:
            text = pc.binary_join_element_wise(title, description, " ", null_handling="skip")
    flag(
        pc.fill_null(pc.match_substring(text, "\x00"), False).to_numpy(zero_copy_only=False),
        "NUL byte in text",
    )
    blank = pc.fill_null(pc.equal(pc.binary_length(pc.utf8_trim_whitespace(text)), 0), True)
    flag(blank.to_numpy(zero_copy_only=False), "empty text")

    if mapping.label is not None:
        label_text, invalid = _to_text(raw[mapping.label])
        flag(invalid, f"invalid UTF-8 in column {mapping.label!r}")
        label, unknown = parse_labels(label_text, mapping.label_format)
        allowed = {"index0": "0-3", "index1": "1-4", "name": "a class name"}.get(
            mapping.label_format, "1-4 or a class name"
        )
        shown = label_text.cast(pa.string()).to_pylist() if unknown.any() else None
        if shown is not None:
            why = np.array([f"label {str(v)[:40]!r} is not {allowed}" for v in shown], dtype=object)
            flag(unknown, why)
    else:
        label = pa.nulls(n, pa.int8())

    if mapping.id is not None:
        ids, invalid = _to_text(raw[mapping.id])
        flag(invalid, f"invalid UTF-8 in column {mapping.id!r}")
        ids = pc.coalesce(ids, pa.array([f"{name}:{r}" for r in rows], pa.string()))
    else:
        ids = pc.binary_join_element_wise(
            pa.array(np.full(n, name, dtype=object), pa.string()),
            pa.array(rows).cast(pa.string()),
            ":",
        )

    kept = {c: text_of(c) for c in mapping.keep}

    rejected = reason != None  # noqa: E711
    raw_bytes = pa.nulls(n, pa.binary())
    if rejected.any():
        raw_bytes = pa.array(
            [_raw_of(raw, i) if r else None for i, r in enumerate(rejected)], pa.binary()
        )
    return pa.table(
        {
            "id": ids,
            "label": label,
            "text": pc.if_else(pa.array(rejected), pa.scalar(None, pa.string()), text),
            "file": pa.array(np.full(n, name, dtype=object), pa.string()),
            "row": pa.array(rows, pa.int64()),
            "reason": pa.array(reason, pa.string()),
            "raw": raw_bytes,
            **kept,
        },
        schema=row_schema(mapping.keep),
    )


def _raw_of(raw: pa.Table, i: int) -> bytes:
    """A rejected row's fields as one CSV line, bytes kept as they were."""
    fields = []
    for col in raw.columns:
        v = col[i].as_py()
        if v is None:
            v = b""
        elif not isinstance(v, bytes):
            v = str(v).encode("utf-8", "surrogateescape")
        fields.append(b'"' + v.replace(b'"', b'""') + b'"')
    return b",".join(fields)


def _bad_rows_table(
    bad: list[tuple[int, str, bytes]], name: str, keep: tuple[str, ...] = ()
) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([f"{name}:{line}" for line, _, _ in bad], pa.string()),
            "label": pa.nulls(len(bad), pa.int8()),
            "text": pa.nulls(len(bad), pa.string()),
            "file": pa.array([name] * len(bad), pa.string()),
            "row": pa.array([line for line, _, _ in bad], pa.int64()),
            "reason": pa.array([why for _, why, _ in bad], pa.string()),
            "raw": pa.array([raw for _, _, raw in bad], pa.binary()),
            **{c: pa.nulls(len(bad), pa.string()) for c in keep},
        },
        schema=row_schema(keep),
    )


def reject_where(rows: pa.Table, mask: pa.Array, why: str) -> pa.Table:
    """Rejects the still-accepted rows under `mask` with reason `why`, their text kept as raw
    bytes: for the stages after the reader (no tokens in text, a missing label)."""
    mask = pc.fill_null(pc.and_kleene(pc.is_null(rows["reason"]), mask), False)
    if not pc.any(mask).as_py():
        return rows
    reason = pc.if_else(mask, pa.scalar(why), rows["reason"])
    raw = pc.if_else(mask, pc.cast(rows["text"], pa.binary()), rows["raw"])
    rows = rows.set_column(rows.schema.get_field_index("reason"), "reason", reason)
    return rows.set_column(rows.schema.get_field_index("raw"), "raw", raw)


# --- on Ray ----------------------------------------------------------------------------------


@contextlib.contextmanager
def reraise_data_errors():
    """A DataError raised in a Ray task (a missing column, say) comes out as itself.

    Ray Data wraps a task's exception in a UserCodeException that keeps only its text, so the
    reader's one-line message is found in that text.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        found = _DATA_ERROR_LINE.search(str(e))
        if found:
            raise DataError(found.group(1)) from e
        raise


_DATA_ERROR_LINE = re.compile(r"agnews\.data\.DataError: ([^\n]+)")

ROWS_PER_BLOCK = 16_384  # enough rows for vectorised kernels, enough blocks for 2+ workers


def read_files(
    batch: pa.Table, fmt: str, mapping: ColumnMapping | None, max_row_bytes: int
) -> pa.Table:
    """map_batches over {path, name, source}: each file's rows (ROW_SCHEMA + source)."""
    tables = []
    columns = (batch[c].to_pylist() for c in ("path", "name", "source"))
    for path, name, source in zip(*columns):
        rows = read_rows(path, fmt, mapping, name=name, max_row_bytes=max_row_bytes)
        tables.append(rows.append_column("source", pa.array([source] * rows.num_rows, pa.string())))
    return pa.concat_tables(tables)


def read_dataset(
    items: list[dict],
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    *,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
):
    """A Ray Dataset of every row of the files in `items` ({path, name, source} dicts, as
    from `expand_paths`): one read task per file, then blocks of ROWS_PER_BLOCK rows so the
    stages after it run in parallel even on one big file."""
    import ray

    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_files,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"fmt": fmt, "mapping": mapping, "max_row_bytes": max_row_bytes},
        )
        .repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    )
