"""The preparation job on a real (small) local Ray: outputs, accounting, bad input, atomicity."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agnews.cli import main
from agnews.config import PrepareConfig
from agnews.prepare import PrepareError, load_manifest, prepare, prepare_ag_news
from agnews.synthetic import make_ag_news
from agnews.text import basic_english


@pytest.fixture(scope="module")
def ag_news_dir(tmp_path_factory):
    return make_ag_news(tmp_path_factory.mktemp("ag_news"), train_rows=600, test_rows=150, seed=1)


def read_split(out, split):
    return pq.read_table(out / split)


def silent(*args, **kwargs):
    pass


def test_prepare_writes_splits_vocab_and_manifest(ray_session, ag_news_dir, tmp_path):
    out = tmp_path / "prep"
    manifest = prepare_ag_news(
        str(ag_news_dir), str(out), PrepareConfig(val_fraction=0.2), log=silent
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "rejected",
        "test",
        "train",
        "val",
        "vocab.json",
    ]
    tables = {s: read_split(out, s) for s in ("train", "val", "test")}
    for table in tables.values():
        assert table.schema.names == ["id", "label", "ids", "length"]
        assert table.schema.field("ids").type == pa.list_(pa.int32())
        assert table.schema.field("label").type == pa.int8()
    assert tables["train"].num_rows + tables["val"].num_rows == 600
    assert 60 < tables["val"].num_rows < 180  # about 20%
    assert tables["test"].num_rows == 150
    assert json.loads((out / "manifest.json").read_text()) == manifest == load_manifest(out)
    assert manifest["rows_read"] == 750 and manifest["rejected"]["rows"] == 0
    assert {s: manifest["splits"][s]["rows"] for s in tables} == {
        s: t.num_rows for s, t in tables.items()
    }
    assert manifest["notes"] == [
        "train: 600 rows accepted; the official AG_NEWS train set has 120,000",
        "test: 150 rows accepted; the official AG_NEWS test set has 7,600",
    ]
    # Rows in id order of the source, labels 0-3, lengths equal to the lists.
    train = tables["train"].to_pylist()
    assert all(r["length"] == len(r["ids"]) >= 1 for r in train)
    assert {r["label"] for r in train} <= {0, 1, 2, 3}
    ids = {r["id"] for r in train} | set(tables["val"]["id"].to_pylist())
    assert ids == {f"train.csv:{i}" for i in range(1, 601)}


def test_val_split_is_deterministic_and_seeded(ray_session, ag_news_dir, tmp_path):
    def val_ids(seed, name):
        out = tmp_path / name
        prepare_ag_news(
            str(ag_news_dir), str(out), PrepareConfig(val_fraction=0.25, seed=seed), log=silent
        )
        return set(read_split(out, "val")["id"].to_pylist())

    first, again, other = val_ids(0, "a"), val_ids(0, "b"), val_ids(1, "c")
    assert first == again
    assert first != other


def test_vocab_equals_torchtext_with_no_val_split(ray_session, ag_news_dir, tmp_path):
    out = tmp_path / "prep"
    prepare_ag_news(
        str(ag_news_dir), str(out), PrepareConfig(val_fraction=0.0, max_len=8), log=silent
    )
    import csv

    counter = Counter()
    with open(ag_news_dir / "train.csv", newline="") as f:
        for _, title, description in csv.reader(f):
            counter.update(basic_english(title + " " + description))
    expected = ["<pad>", "<unk>"] + [
        t for t, _ in sorted(counter.items(), key=lambda x: (-x[1], x[0]))
    ]
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["itos"] == expected
    assert read_split(out, "val").num_rows == 0
    # Encoding: the first row's ids are its tokens' positions, cut at max_len.
    first = [r for r in read_split(out, "train").to_pylist() if r["id"] == "train.csv:1"][0]
    with open(ag_news_dir / "train.csv", newline="") as f:
        _, title, description = next(csv.reader(f))
    tokens = basic_english(title + " " + description)[:8]
    assert first["ids"] == [expected.index(t) for t in tokens]


def write_bad_ag_news(folder, good_rows=200):
    make_ag_news(folder, train_rows=good_rows, test_rows=20, seed=2)
    with open(folder / "train.csv", "ab") as f:
        f.write(b'"2","only two"\n')
        f.write(b'"9","bad","label"\n')
        f.write(b'"1","\xff\xfe","bad utf8"\n')
        f.write(b'"3","","  "\n')
        f.write(b'"4","nul \x00","x"\n')
        f.write(b'"1","' + b"word " * 220_000 + b'","huge"\n')
        f.write(b'"2","""""","..."""\n')  # quotes vanish; "..." stays: 3 tokens
        f.write(b'"3","""",""""\n')  # text of two quote marks: no tokens at all
    return folder


def test_bad_rows_go_to_rejected_with_file_row_and_reason(ray_session, tmp_path):
    data = write_bad_ag_news(tmp_path / "data")
    out = tmp_path / "prep"
    manifest = prepare_ag_news(
        str(data), str(out), PrepareConfig(max_rejected_fraction=0.5), log=silent
    )
    rejected = pq.read_table(out / "rejected").to_pylist()
    by_row = {r["row"]: r for r in rejected}
    assert {r["file"] for r in rejected} == {"train.csv"}
    assert by_row[201]["reason"] == "malformed CSV: expected 3 fields, found 2"
    assert by_row[202]["reason"] == "label '9' is not 1-4"
    assert by_row[203]["reason"] == "invalid UTF-8 in column 'title'"
    assert by_row[204]["reason"] == "empty text"
    assert by_row[205]["reason"] == "NUL byte in text"
    assert by_row[206]["reason"].startswith("row too large")
    assert by_row[208]["reason"] == "no tokens in text"
    assert 207 not in by_row  # '""' then '..."': three "." tokens, a valid row
    assert by_row[203]["raw"] == b'"1","\xff\xfe","bad utf8"'
    assert manifest["rejected"]["rows"] == len(rejected) == 7
    written = sum(manifest["splits"][s]["rows"] for s in ("train", "val", "test"))
    assert manifest["rows_read"] == written + len(rejected) == 228
    assert manifest["rejected"]["by_reason"]["malformed CSV"] == 1


def test_too_many_bad_rows_stop_the_job_and_leave_nothing(ray_session, tmp_path):
    data = write_bad_ag_news(tmp_path / "data", good_rows=100)
    out = tmp_path / "prep"
    with pytest.raises(PrepareError) as info:
        prepare_ag_news(str(data), str(out), log=silent)
    message = str(info.value)
    assert "7 of 128 rows rejected" in message and "train.csv" in message
    assert "train.csv, row 101: malformed CSV" in message
    assert not out.exists()
    assert list(tmp_path.glob(".prep*")) == []  # no temporary folder left


def test_existing_output_refused_without_overwrite(ray_session, ag_news_dir, tmp_path):
    out = tmp_path / "prep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="exists; pass --overwrite"):
        prepare_ag_news(str(ag_news_dir), str(out), log=silent)
    assert (out / "keep.txt").read_text() == "mine"
    prepare_ag_news(str(ag_news_dir), str(out), overwrite=True, log=silent)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_archive_sources_with_column_mapping(ray_session, tmp_path):
    from agnews.data import ColumnMapping

    (tmp_path / "in").mkdir()
    rows = [{"body": f"goal match season {i}", "topic": "Sports"} for i in range(30)]
    rows += [{"body": f"shares profit bank {i}", "topic": "Business"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part-0.parquet")
    manifest = prepare(
        {"train": [str(tmp_path / "in")], "test": [str(tmp_path / "in" / "part-0.parquet")]},
        str(tmp_path / "prep"),
        PrepareConfig(val_fraction=0.0),
        mapping=ColumnMapping(text="body", label="topic"),
        log=silent,
    )
    assert manifest["splits"]["train"]["rows"] == 60 and manifest["splits"]["test"]["rows"] == 60
    labels = read_split(tmp_path / "prep", "train")["label"].to_pylist()
    assert sorted(set(labels)) == [1, 2]


def test_cli_prepare(ray_session, ag_news_dir, tmp_path):
    out = tmp_path / "prep"
    result = CliRunner().invoke(
        main, ["prepare", "--data", str(ag_news_dir), "--out", str(out), "--max-size", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "prepared" in result.output and "rejected 0 of 750" in result.output
    assert len(json.loads((out / "vocab.json").read_text())["itos"]) == 20
    again = CliRunner().invoke(main, ["prepare", "--data", str(ag_news_dir), "--out", str(out)])
    assert again.exit_code != 0 and "pass --overwrite" in again.output
    missing = CliRunner().invoke(
        main, ["prepare", "--data", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert missing.exit_code != 0 and "no train.csv here" in missing.output


def test_missing_column_is_one_clear_error_not_a_ray_traceback(ray_session, tmp_path):
    from agnews.data import ColumnMapping, DataError

    (tmp_path / "in.csv").write_text("headline,body\nx,y\n")
    with pytest.raises(DataError, match=r"in.csv: no column 'text'; columns found: headline, body"):
        prepare(
            {"train": [str(tmp_path / "in.csv")]},
            str(tmp_path / "prep"),
            mapping=ColumnMapping(text="text"),
            log=silent,
        )
    assert not (tmp_path / "prep").exists()
