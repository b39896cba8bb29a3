"""Bulk inference: outputs and accounting on a real local Ray, bad input, an actor crash,
the length-sorted forward and long-text modes against a direct forward, and `classify`."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from agnews.checkpoint import BundleError, save_bundle
from agnews.cli import main
from agnews.config import LABEL_NAMES
from agnews.data import ColumnMapping, DataError, read_rows
from agnews.infer import (
    CRASH_ENV,
    PredictError,
    class_probabilities,
    classify_texts,
    inference_model,
    predict,
    resolve_bundle,
)
from agnews.model import LSTMClassifier, ModelConfig
from agnews.synthetic import SHARED_WORDS, TOPIC_WORDS, make_ag_news
from agnews.text import tokenize

DEFAULT_MAPPING_KEEPING_TITLE = ColumnMapping(text="text", keep=("title",))
MAX_LEN = 8  # short, so that synthetic rows (6-20 words) are cut and chunked

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int8()),
        ("pred", pa.int8()),
        ("pred_name", pa.string()),
        ("confidence", pa.float32()),
        ("probs", pa.list_(pa.float32())),
    ]
)


def silent(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run folder holding a tiny untrained bundle in model/."""
    itos = ["<pad>", "<unk>"] + sorted(
        set(" ".join(TOPIC_WORDS.values()).split() + SHARED_WORDS.split() + [".", ","])
    )
    config = ModelConfig(vocab_size=len(itos), embed_dim=8, hidden_dim=8)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_bundle(run / "model", LSTMClassifier(config), config, itos, max_len=MAX_LEN)
    return run


@pytest.fixture(scope="module")
def bundle_dir(run_dir):
    return run_dir / "model"


@pytest.fixture(scope="module")
def ready(bundle_dir):
    return inference_model(bundle_dir)


def direct_probs(model, ids: list[int]) -> np.ndarray:
    """One row through the model alone: no sorting, no batching."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.tensor([len(ids)]))
    return torch.softmax(logits, dim=-1)[0].numpy()


# --- without Ray -----------------------------------------------------------------------------


def test_resolve_bundle_takes_a_run_or_a_bundle_and_refuses_others(run_dir, tmp_path):
    assert resolve_bundle(run_dir) == run_dir / "model"
    assert resolve_bundle(run_dir / "model") == run_dir / "model"
    with pytest.raises(BundleError, match="not a model bundle .* nor a training run"):
        resolve_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such run or bundle folder"):
        resolve_bundle(tmp_path / "missing")


def test_sorted_batched_forward_equals_one_row_at_a_time(bundle_dir):
    """Rows of many lengths, cut into small length-sorted slices: same numbers, input order."""
    im = inference_model(bundle_dir, forward_rows=3)
    rng = np.random.default_rng(0)
    words = [t for t in im.vocab.itos[2:]]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=17)]
    tokens = tokenize(pa.array(texts))
    ids = im.vocab.encode(tokens).to_pylist()

    truncated = class_probabilities(im, tokens, "truncate")
    chunked = class_probabilities(im, tokens, "chunk")
    for row, row_ids in enumerate(ids):
        np.testing.assert_allclose(
            truncated[row], direct_probs(im.model, row_ids[:MAX_LEN]), atol=1e-5
        )
        windows = [row_ids[i : i + MAX_LEN] for i in range(0, len(row_ids), MAX_LEN)]
        expected = np.mean([direct_probs(im.model, w) for w in windows], axis=0)
        np.testing.assert_allclose(chunked[row], expected, atol=1e-5)
    long_rows = [i for i, r in enumerate(ids) if len(r) > MAX_LEN]
    assert long_rows and not np.allclose(truncated[long_rows], chunked[long_rows], atol=1e-4)
    np.testing.assert_allclose(truncated.sum(axis=1), 1.0, atol=1e-5)


def test_int8_mode_quantizes_and_stays_close(bundle_dir, ready):
    quantized = inference_model(bundle_dir, int8=True)
    assert "quantized" in type(quantized.model.rnns[0]).__module__
    texts = ["shares profit bank merger", "goal match season coach", "nasa chip linux"]
    fp32 = classify_texts(ready, texts)
    int8 = classify_texts(quantized, texts)
    for a, b in zip(fp32, int8, strict=True):
        assert sum(b.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(abs(a.probs[n] - b.probs[n]) for n in LABEL_NAMES) < 0.02


def test_classify_prints_class_and_probabilities_for_text_and_stdin(bundle_dir, ready):
    runner = CliRunner()
    text = "Quarterly profit at the bank beat forecasts, shares rose"
    one = runner.invoke(main, ["classify", "--model", str(bundle_dir), text])
    assert one.exit_code == 0, one.output
    expected = classify_texts(ready, [text])[0]
    name, confidence, probs = one.output.strip().split("\t")
    assert name == expected.pred_name and float(confidence) == pytest.approx(
        expected.confidence, abs=1e-3
    )
    assert all(f"{n} {expected.probs[n]:.3f}" in probs for n in LABEL_NAMES)

    lines = 'nasa launches spacecraft\n\n"""\nstriker scores in the playoff\n'
    many = runner.invoke(main, ["classify", "--model", str(bundle_dir), "--json"], input=lines)
    assert many.exit_code == 0, many.output
    results = [json.loads(line) for line in many.output.strip().splitlines()]
    assert [r["text"] for r in results] == [
        "nasa launches spacecraft",
        '"""',
        "striker scores in the playoff",
    ]
    assert results[1]["pred"] is None and results[1]["reason"] == "no tokens in text"
    assert results[2]["pred_name"] == classify_texts(ready, [results[2]["text"]])[0].pred_name

    bad = runner.invoke(main, ["classify", "--model", str(bundle_dir.parent.parent), "x"])
    assert bad.exit_code == 1 and "not a model bundle" in bad.output


def test_a_bad_bundle_is_refused_before_any_work(bundle_dir, tmp_path):
    data = make_ag_news(tmp_path / "data", train_rows=1, test_rows=5)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="not a model bundle"):
        predict([str(data / "test.csv")], tmp_path / "data", out, log=silent)

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    vocab = json.loads((broken / "vocab.json").read_text())
    vocab["itos"].append("extra")
    (broken / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(BundleError, match=r"vocab\.json: \d+ tokens, but .*config\.json says"):
        predict([str(data / "test.csv")], broken, out, log=silent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "data"]  # no out, no temp


def test_an_existing_out_is_refused_without_overwrite(bundle_dir, tmp_path):
    data = make_ag_news(tmp_path / "data", train_rows=1, test_rows=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(PredictError, match="exists; pass --overwrite"):
        predict([str(data / "test.csv")], bundle_dir, out, log=silent)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


# --- on Ray -------------------------------------------------------------------------------------


def official_line(label, title, description) -> bytes:
    def quoted(v: str) -> bytes:
        return b'"' + v.replace('"', '""').encode() + b'"'

    return b",".join([quoted(label), quoted(title), quoted(description)])


def test_predict_writes_every_row_once_with_predictions_and_report(
    ray_session, bundle_dir, ready, tmp_path
):
    archive = tmp_path / "archive"
    make_ag_news(archive, train_rows=0, test_rows=120, seed=3)
    (archive / "train.csv").unlink()
    (archive / "extra").mkdir()
    bad_lines = [
        official_line("2", "Striker scores", "late goal in the playoff."),  # 1: fine
        b'"3","too few fields"',  # 2
        official_line("4", "  ", " "),  # 3: empty text
        official_line("9", "Label", "out of range"),  # 4
        official_line("1", '""', ""),  # 5: text of quotes only: no token once they are dropped
        official_line("3", "Bank", "profit shares merger stocks investors revenue inflation"),
    ]
    (archive / "extra" / "bad.csv").write_bytes(b"\n".join(bad_lines) + b"\n")

    out = tmp_path / "out"
    summary = predict(
        [str(archive)], bundle_dir, out, max_rejected_fraction=0.05, batch_size=50, log=silent
    )

    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.png",
        "manifest.json",
        "predictions",
        "rejected",
        "report.json",
        "report.md",
        "report.parquet",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    predictions = pq.read_table(out / "predictions")
    rejected = pq.read_table(out / "rejected")
    assert predictions.schema.remove_metadata() == PREDICTION_SCHEMA
    assert rejected.schema.names == ["id", "file", "row", "reason", "raw"]

    # Every input row exactly once, in one place or the other.
    expected_ids = {f"test.csv:{i}" for i in range(1, 121)} | {
        f"extra/bad.csv:{i}" for i in range(1, 7)
    }
    ids = predictions["id"].to_pylist() + rejected["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 126 and set(ids) == expected_ids
    reasons = {r["row"]: r["reason"] for r in rejected.to_pylist()}
    assert reasons == {
        2: "malformed CSV: expected 3 fields, found 2",
        3: "empty text",
        4: "label '9' is not 1-4",
        5: "no tokens in text",
    }
    assert set(rejected["file"].to_pylist()) == {"extra/bad.csv"}
    raw = {r["row"]: r["raw"] for r in rejected.to_pylist()}
    assert raw[2] == b'"3","too few fields"' and raw[5] == b'"" '  # the text that had no token
    assert summary == json.loads((out / "manifest.json").read_text())
    assert (summary["rows_read"], summary["predictions"], summary["rejected"]) == (126, 122, 4)

    # The same numbers as this process computes with the same tokenize/encode code.
    rows = {
        r["id"]: r
        for name, path in (("test.csv", archive / "test.csv"), ("extra/bad.csv", None))
        for r in read_rows(str(path or archive / "extra" / "bad.csv"), name=name).to_pylist()
    }
    got = predictions.to_pylist()
    local = classify_texts(ready, [rows[r["id"]]["text"] for r in got])
    for row, mine in zip(got, local, strict=True):
        assert row["label"] == rows[row["id"]]["label"]
        np.testing.assert_allclose(row["probs"], list(mine.probs.values()), atol=1e-5)
        assert row["pred"] == mine.pred == int(np.argmax(row["probs"]))
        assert row["pred_name"] == LABEL_NAMES[row["pred"]]
        assert row["confidence"] == pytest.approx(max(row["probs"]))

    report = json.loads((out / "report.json").read_text())
    correct = sum(r["pred"] == r["label"] for r in got)
    assert report["rows"] == 122 and report["rejected"] == 4
    assert report["accuracy"] == pytest.approx(correct / 122)
    assert summary["accuracy"] == report["accuracy"]
    confusion = np.zeros((4, 4), int)
    for r in got:
        confusion[r["label"], r["pred"]] += 1
    assert report["confusion_matrix"]["counts"] == confusion.tolist()
    assert (out / "confusion.png").stat().st_size > 1000


def test_cli_predict_mapping_ids_keep_columns_chunks_and_overwrite(
    ray_session, run_dir, ready, tmp_path
):
    rng = np.random.default_rng(5)
    words = {label: TOPIC_WORDS[label + 1].split() for label in range(4)}
    rows = []
    for i in range(40):
        label = int(rng.integers(4))
        body = " ".join(rng.choice(words[label], size=int(rng.integers(3, 30))))
        rows.append((f"u{i}", f"Head {i}", body, LABEL_NAMES[label].lower(), f"https://n/{i}"))
    table = pa.table(dict(zip(["uid", "headline", "body", "topic", "url"], zip(*rows))))
    source = tmp_path / "news.csv"
    pa.csv.write_csv(table, source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("replaced")

    args = ["predict", "--model", str(run_dir), "--input", str(source), "--out", str(out)]
    args += ["--title-col", "headline", "--description-col", "body", "--label-col", "topic"]
    args += ["--label-format", "name", "--id-col", "uid", "--keep-columns", "url"]
    args += ["--long-text", "chunk", "--batch-size", "16", "--workers", "1"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "exists; pass --overwrite" in refused.output

    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "40 predictions + 0 rejected = 40 rows read" in result.output
    assert not (out / "old.txt").exists()
    got = pq.read_table(out / "predictions")
    assert got.schema.names == [*PREDICTION_SCHEMA.names, "url"]
    by_id = {r["id"]: r for r in got.to_pylist()}
    assert sorted(by_id) == sorted(r[0] for r in rows)
    texts = [f"{r[1]} {r[2]}" for r in rows]
    chunked = class_probabilities(ready, tokenize(pa.array(texts)), "chunk")
    for (uid, _, _, topic, url), probs in zip(rows, chunked, strict=True):
        assert by_id[uid]["url"] == url
        assert by_id[uid]["label"] == [n.lower() for n in LABEL_NAMES].index(topic)
        np.testing.assert_allclose(by_id[uid]["probs"], probs, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["long_text"] == "chunk" and manifest["keep_columns"] == ["url"]


def test_predict_jsonl_and_parquet_without_labels_reports_the_class_distribution(
    ray_session, bundle_dir, tmp_path
):
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"text": f"nasa chip {i}", "n": i}) for i in range(30)]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["goal match"] * 20}), tmp_path / "in" / "b.parquet")
    out = tmp_path / "out"
    summary = predict(
        [str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "in" / "b.parquet")],
        bundle_dir,
        out,
        workers=1,
        log=silent,
    )
    assert (summary["rows_read"], summary["predictions"], summary["rejected"]) == (50, 50, 0)
    predictions = pq.read_table(out / "predictions")
    assert predictions["label"].null_count == 50
    assert sorted(set(i.split(":")[0] for i in predictions["id"].to_pylist())) == [
        "a.jsonl",
        "b.parquet",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] is None and not report["has_labels"]
    counts = np.bincount(predictions["pred"].to_numpy(), minlength=4).tolist()
    assert list(report["class_distribution"].values()) == counts
    assert summary["class_distribution"] == report["class_distribution"]
    assert "No labels" in (out / "report.md").read_text()


def test_a_missing_column_names_the_file_and_the_columns_found(ray_session, run_dir, tmp_path):
    source = tmp_path / "news.csv"
    source.write_text("headline,body\nA,b\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["predict", "--model", str(run_dir), "--input", str(source), "--out", str(out)]
        + ["--workers", "1"],
    )
    assert result.exit_code == 1
    assert f"Error: {source}: no column 'text'; columns found: headline, body" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_too_many_bad_rows_are_refused_naming_file_row_and_reason(
    ray_session, bundle_dir, tmp_path
):
    lines = [official_line("1", "Troops", "ceasefire summit")] * 8
    lines[2] = official_line("2", " ", "")
    (tmp_path / "in.csv").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    with pytest.raises(
        PredictError, match=r"1 of 8 rows cannot be classified .*\n  in\.csv, row 3: empty text"
    ):
        predict([str(tmp_path / "in.csv")], bundle_dir, out, workers=1, log=silent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_an_actor_crash_mid_job_still_leaves_every_row_once(
    ray_session, bundle_dir, tmp_path, monkeypatch
):
    data = make_ag_news(tmp_path / "data", train_rows=1, test_rows=400, seed=7)
    marker = tmp_path / "crashed"
    # The actor dies on its 3rd batch, part-way through its block; Ray restarts it and retries.
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")
    out = tmp_path / "out"
    summary = predict(
        [str(data / "test.csv")], bundle_dir, out, batch_size=50, workers=1, log=silent
    )
    assert marker.exists()
    ids = pq.read_table(out / "predictions")["id"].to_pylist()
    assert len(ids) == 400 and set(ids) == {f"test.csv:{i}" for i in range(1, 401)}
    assert (summary["rows_read"], summary["predictions"], summary["rejected"]) == (400, 400, 0)


def test_the_reader_keeps_asked_columns_as_text_bad_rows_included(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(official_line("3", "Bank", "profit") + b'\n"1","too few"\n')
    table = read_rows(str(path), mapping=DEFAULT_MAPPING_KEEPING_TITLE)
    assert table.schema.names[-1] == "title" and table.schema.field("title").type == pa.string()
    good, bad = table.to_pylist()
    assert (good["text"], good["title"], good["label"]) == ("Bank profit", "Bank", 2)
    assert bad["reason"].startswith("malformed CSV") and bad["title"] is None
    with pytest.raises(DataError, match=r"cannot keep column\(s\) \['row'\]"):
        ColumnMapping(text="text", keep=("row",))
    with pytest.raises(PredictError, match=r"cannot keep column\(s\) \['pred'\]"):
        predict([str(path)], tmp_path, tmp_path / "out", keep_columns=["pred"], log=silent)
