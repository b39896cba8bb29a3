"""Readers: every input row comes out once, bad ones with file, row and reason. No Ray here."""

import json
import urllib.error

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agnews import data
from agnews.data import ColumnMapping, DataError, expand_paths, read_rows


def rows_by_number(table):
    return {r["row"]: r for r in table.to_pylist()}


def test_official_format_rows_ids_labels_and_text(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(
        b'"3","Wall St. Bears","Short-sellers, ""ultra-cynics"", see green."\n"1","T","D"\n'
    )
    table = read_rows(str(path))
    assert table.schema == data.ROW_SCHEMA
    first, second = table.to_pylist()
    assert first["id"] == "train.csv:1" and first["label"] == 2 and first["reason"] is None
    assert first["text"] == 'Wall St. Bears Short-sellers, "ultra-cynics", see green.'
    assert second["id"] == "train.csv:2" and second["label"] == 0 and second["text"] == "T D"


def test_every_kind_of_bad_row_is_kept_with_file_row_and_reason(tmp_path):
    huge = b"a" * (1024 * 1024)
    lines = [
        b'"1","good","row"',  # 1
        b'"2","too few"',  # 2: wrong field count
        b"",  # 3: empty line
        b'"7","label","out of range"',  # 4
        b'"x","label","not a number"',  # 5
        b'"3","bad \xff\xfe utf-8","d"',  # 6
        b'"4","nul\x00byte","d"',  # 7
        b'"2","","   "',  # 8: empty text
        b'"1","' + huge + b'","d"',  # 9: 1 MB row
        b'"2","broken "quoting","d"',  # 10
        b'"2","a","b","c"',  # 11: too many fields
        b'"4","last","good row"',  # 12
    ]
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table = read_rows(str(path))
    assert table.num_rows == len(lines)
    rows = rows_by_number(table)
    assert sorted(rows) == list(range(1, 13))
    assert all(r["file"] == "bad.csv" for r in rows.values())
    reasons = {n: r["reason"] for n, r in rows.items()}
    assert reasons[1] is None and reasons[12] is None
    assert reasons[2] == "malformed CSV: expected 3 fields, found 2"
    assert reasons[3] == "empty text"
    assert reasons[4] == "label '7' is not 1-4"
    assert reasons[5] == "label 'x' is not 1-4"
    assert reasons[6] == "invalid UTF-8 in column 'title'"
    assert reasons[7] == "NUL byte in text"
    assert reasons[8] == "empty text"
    assert reasons[9].startswith("row too large (1,048,")
    assert reasons[10].startswith("malformed CSV")
    assert reasons[11] == "malformed CSV: expected 3 fields, found 4"
    # Nothing lost: the raw bytes of each rejected row are kept.
    assert rows[6]["raw"] == b'"3","bad \xff\xfe utf-8","d"'
    assert rows[2]["raw"] == b'"2","too few"'
    assert huge in rows[9]["raw"]
    assert all(r["raw"] is None for n, r in rows.items() if n in (1, 12))


def test_headered_csv_with_quoted_newlines_numbers_lines(tmp_path):
    path = tmp_path / "news.csv"
    path.write_bytes(
        b"id,headline,body,topic\n"
        b'a1,"two\nlines",b,world\n'
        b"a2,t2,b2,Business\n"
        b"a3,short\n"
        b"a4,t,b,sci/tech\n"
        b"a5,t,b,\n"
    )
    mapping = ColumnMapping(title="headline", description="body", label="topic", id="id")
    rows = rows_by_number(read_rows(str(path), mapping=mapping))
    assert sorted(rows) == [2, 4, 5, 6, 7]
    assert rows[2]["id"] == "a1" and rows[2]["text"] == "two\nlines b" and rows[2]["label"] == 0
    assert rows[4]["label"] == 2
    assert rows[5]["reason"] == "malformed CSV: expected 4 fields, found 2"
    assert rows[5]["id"] == "news.csv:5"
    assert rows[6]["label"] == 3
    assert rows[7]["label"] is None and rows[7]["reason"] is None  # no label: unlabelled, fine


def test_tsv_jsonl_and_parquet_with_column_mapping(tmp_path):
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello there\t0\nsecond\t3\n")
    tsv = read_rows(
        str(tmp_path / "a.tsv"),
        mapping=ColumnMapping(text="text", label="label", label_format="index0"),
    )
    assert tsv["label"].to_pylist() == [0, 3] and tsv["row"].to_pylist() == [2, 3]

    (tmp_path / "b.jsonl").write_bytes(
        b'{"body": "x y", "cls": "Sports"}\n{"body": 5}\nnot json\n[1]\n{"body": "\xff"}\n'
    )
    jl = rows_by_number(
        read_rows(str(tmp_path / "b.jsonl"), mapping=ColumnMapping(text="body", label="cls"))
    )
    assert jl[1]["label"] == 1 and jl[1]["text"] == "x y"
    assert jl[2]["text"] == "5" and jl[2]["reason"] is None
    assert jl[3]["reason"].startswith("malformed JSON")
    assert jl[4]["reason"] == "malformed JSON: not a JSON object"
    assert jl[5]["reason"] == "invalid UTF-8"

    pq.write_table(pa.table({"t": ["a b", None], "y": [1, 4]}), tmp_path / "c.parquet")
    pt = rows_by_number(
        read_rows(str(tmp_path / "c.parquet"), mapping=ColumnMapping(text="t", label="y"))
    )
    assert pt[1]["label"] == 0 and pt[1]["id"] == "c.parquet:1"
    assert pt[2]["reason"] == "empty text" and pt[2]["label"] == 3


def test_missing_column_lists_the_columns_found(tmp_path):
    (tmp_path / "a.csv").write_text("headline,body\nx,y\n")
    with pytest.raises(DataError, match=r"a.csv: no column 'text'; columns found: headline, body"):
        read_rows(str(tmp_path / "a.csv"), mapping=ColumnMapping(text="text"))


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        expand_paths([str(tmp_path / "nope.csv")])
    with pytest.raises(DataError, match="no train.csv here"):
        data.ag_news_files(tmp_path)
    with pytest.raises(DataError, match="no file matches"):
        expand_paths([str(tmp_path / "*.parquet")])


def test_expand_paths_folders_globs_and_names(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.csv", "sub/b.csv", "_SUCCESS", ".hidden.csv", "c.jsonl"):
        (tmp_path / name).write_text("x")
    from_folder = expand_paths(str(tmp_path))
    assert [name for _, name in from_folder] == ["a.csv", "c.jsonl", "sub/b.csv"]
    from_glob = expand_paths([str(tmp_path / "*.csv")])
    assert [name for _, name in from_glob] == ["a.csv"]
    assert expand_paths([str(tmp_path / "a.csv")]) == [(str(tmp_path / "a.csv"), "a.csv")]


def test_format_detection(tmp_path):
    assert data.detect_format("x/train.csv", b'"3","t","d"\n') == "ag_news"
    assert data.detect_format("x/news.csv", b"title,text\n") == "csv"
    assert data.detect_format("x/news.jsonl.gz", b"") == "jsonl"
    assert data.detect_format("x/p.parquet", b"") == "parquet"
    with pytest.raises(DataError, match="pass --format"):
        data.detect_format("x/file.bin", b"")


def test_labels_by_index_and_name():
    values = pa.array(["1", " 4 ", "World", "sci/tech", "SPORTS", "", None, "9", "Politics"])
    labels, unknown = data.parse_labels(values, "auto")
    assert labels.to_pylist() == [0, 3, 0, 3, 1, None, None, None, None]
    assert unknown.tolist() == [False] * 7 + [True, True]
    labels, unknown = data.parse_labels(pa.array(["0", "3", "4"]), "index0")
    assert labels.to_pylist() == [0, 3, None] and unknown.tolist() == [False, False, True]


def test_download_offline_says_to_pass_data(tmp_path, monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match="Pass --data DIR"):
        data.download_ag_news(tmp_path)
    assert not any((tmp_path / "ag_news").iterdir())  # no partial file left behind


def test_download_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    served = {"train": b'"1","a","b"\n', "test": b'"2","c","d"\n'}

    def fake_fetch(url, filename):
        split = "train" if url.endswith("train.csv") else "test"
        with open(filename, "wb") as f:
            f.write(served[split])

    import hashlib

    monkeypatch.setattr(data.urllib.request, "urlretrieve", fake_fetch)
    monkeypatch.setattr(
        data, "AG_NEWS_MD5", {s: hashlib.md5(b).hexdigest() for s, b in served.items()}
    )
    folder = data.download_ag_news(tmp_path)
    assert (folder / "train.csv").read_bytes() == served["train"]
    monkeypatch.setattr(data, "AG_NEWS_MD5", {"train": "0" * 32, "test": "0" * 32})
    (folder / "train.csv").unlink()
    with pytest.raises(DataError, match="MD5"):
        data.download_ag_news(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv"]


def test_torchtext_source_constants():
    assert data.AG_NEWS_MD5 == {
        "train": "b1a00f826fdfbd249f79597b59e1dc12",
        "test": "d52ea96a97a2d943681189a97654912d",
    }
    assert data.AG_NEWS_ROWS == {"train": 120000, "test": 7600}
    assert all(u.startswith("https://") and u.endswith(".csv") for u in data.AG_NEWS_URLS.values())


def test_shared_test_set_matches_torchtext_md5_when_present():
    from pathlib import Path

    test_csv = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "test.csv"
    if not test_csv.exists():
        pytest.skip("../shared/data/ag_news is not beside this checkout")
    assert data.md5_of(test_csv) == data.AG_NEWS_MD5["test"]
    table = read_rows(str(test_csv))
    assert table.num_rows == 7600 and table["reason"].null_count == 7600
    assert json.dumps(table.slice(0, 1).to_pylist()[0]["id"]) == '"test.csv:1"'
