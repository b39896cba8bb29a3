import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agnews.config import LABEL_NAMES, NUM_CLASSES
from agnews.report import (
    REPORT_FILES,
    PredictionCounts,
    _write_atomic,
    compute_report,
    confusion_counts,
    prediction_counts,
    report_from_dataset,
    write_report,
)


def predictions_table(labels, preds) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(len(preds))], pa.string()),
            "label": pa.array(labels, pa.int8()),
            "pred": pa.array(preds, pa.int8()),
        }
    )


def as_dataset(ray, labels, preds, blocks: int):
    """Several blocks, so the per-block partial counts really get summed."""
    table = predictions_table(labels, preds)
    bounds = np.linspace(0, len(table), blocks + 1).astype(int)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])


# (label, pred) pairs worked out by hand below; None = unlabelled row.
HAND_PAIRS = (
    [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 2 + [(2, 2), (2, 3)] + [(None, 2), (None, 2), (None, 0)]
)


def test_hand_computed_metrics(ray_session):
    labels, preds = zip(*HAND_PAIRS)
    ds = as_dataset(ray_session, labels, preds, blocks=3)

    counts = prediction_counts(ds)
    expected = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert counts.confusion.dtype == np.int64
    np.testing.assert_array_equal(counts.confusion, expected)
    np.testing.assert_array_equal(counts.predicted, [4, 3, 3, 1])  # over all 11 rows
    assert counts.unlabelled == 3
    np.testing.assert_array_equal(confusion_counts(ds), expected)

    report = compute_report(counts, rejected=5)
    assert (report.rows, report.labelled_rows, report.unlabelled_rows) == (11, 8, 3)
    assert report.rejected == 5
    assert report.accuracy == pytest.approx(6 / 8)
    by_name = {m.name: m for m in report.per_class}
    assert [m.name for m in report.per_class] == list(LABEL_NAMES)
    # World: 3 of 3 World predictions right, 3 of 4 World rows found.
    assert (by_name["World"].precision, by_name["World"].recall) == (1.0, 0.75)
    assert by_name["World"].f1 == pytest.approx(6 / 7)
    assert by_name["Sports"].precision == pytest.approx(2 / 3)
    assert by_name["Sports"].recall == 1.0
    assert by_name["Sports"].f1 == pytest.approx(0.8)
    assert by_name["Business"].f1 == pytest.approx(2 / 3)
    # Sci/Tech: predicted once (wrongly), never the true label: 0/0 recall -> 0.0.
    sci = by_name["Sci/Tech"]
    assert (sci.precision, sci.recall, sci.f1, sci.support, sci.predicted) == (0.0, 0.0, 0.0, 0, 1)
    assert report.macro_f1 == pytest.approx((6 / 7 + 0.8 + 2 / 3 + 0.0) / 4)
    assert report.class_distribution == (4, 3, 3, 1)


def numpy_metrics(labels: np.ndarray, preds: np.ndarray):
    """Independent recomputation from the rows themselves (labels: -1 = unlabelled)."""
    mask = labels >= 0
    y, p = labels[mask], preds[mask]
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (y, p), 1)
    classes = np.arange(NUM_CLASSES)
    tp = ((y[:, None] == classes) & (p[:, None] == classes)).sum(0)
    pred_pos = (p[:, None] == classes).sum(0)
    true_pos = (y[:, None] == classes).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / pred_pos)
        recall = np.nan_to_num(tp / true_pos)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return confusion, (y == p).mean(), precision, recall, f1


def test_matches_numpy_recomputation_on_random_rows(ray_session):
    rng = np.random.default_rng(7)
    n = 3000
    labels = rng.integers(0, NUM_CLASSES, n)
    # Predictions right ~70% of the time, unlabelled ~10% of rows.
    preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, NUM_CLASSES, n))
    labels[rng.random(n) < 0.1] = -1
    label_list = [None if v < 0 else int(v) for v in labels]
    ds = as_dataset(ray_session, label_list, preds.tolist(), blocks=5)

    report = report_from_dataset(ds, rejected=2)
    confusion, accuracy, precision, recall, f1 = numpy_metrics(labels, preds)
    np.testing.assert_array_equal(np.array(report.confusion), confusion)
    assert report.rows == n
    assert report.labelled_rows == int((labels >= 0).sum())
    assert report.class_distribution == tuple(np.bincount(preds, minlength=NUM_CLASSES))
    assert report.accuracy == pytest.approx(accuracy)
    np.testing.assert_allclose([m.precision for m in report.per_class], precision)
    np.testing.assert_allclose([m.recall for m in report.per_class], recall)
    np.testing.assert_allclose([m.f1 for m in report.per_class], f1)
    assert report.macro_f1 == pytest.approx(f1.mean())


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, (NUM_CLASSES, NUM_CLASSES), elements=st.integers(0, 50)))
def test_compute_report_matches_numpy_for_any_confusion(confusion):
    # Expand the matrix back into rows and recompute from them.
    y, p = np.nonzero(confusion)
    reps = confusion[y, p]
    labels, preds = np.repeat(y, reps), np.repeat(p, reps)
    counts = PredictionCounts(confusion=confusion, predicted=confusion.sum(axis=0), unlabelled=0)
    report = compute_report(counts)
    if confusion.sum() == 0:
        assert report.accuracy is None and report.macro_f1 is None
        return
    _, accuracy, precision, recall, f1 = numpy_metrics(labels, preds)
    assert report.accuracy == pytest.approx(accuracy)
    np.testing.assert_allclose([m.precision for m in report.per_class], precision)
    np.testing.assert_allclose([m.recall for m in report.per_class], recall)
    np.testing.assert_allclose([m.f1 for m in report.per_class], f1)
    for m in report.per_class:
        assert 0.0 <= m.f1 <= 1.0


def test_write_report_files(ray_session, tmp_path):
    labels, preds = zip(*HAND_PAIRS)
    report = report_from_dataset(as_dataset(ray_session, labels, preds, blocks=2), rejected=1)
    paths = write_report(report, tmp_path / "report")

    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)
    assert set(paths) == set(REPORT_FILES)

    table = pq.read_table(paths["report.parquet"])
    assert table.column_names == [
        "kind",
        "name",
        "precision",
        "recall",
        "f1",
        "support",
        "predicted",
        "value",
    ]
    rows = {r["name"]: r for r in table.to_pylist()}
    assert [r["kind"] for r in table.to_pylist()] == ["class"] * 4 + ["overall"] * 2
    assert rows["World"]["recall"] == 0.75 and rows["World"]["support"] == 4
    assert rows["World"]["value"] is None
    assert rows["accuracy"]["value"] == pytest.approx(0.75)
    assert rows["macro_f1"]["value"] == pytest.approx(report.macro_f1)
    assert rows["accuracy"]["precision"] is None

    doc = json.loads(paths["report.json"].read_text())
    assert doc["accuracy"] == pytest.approx(0.75)
    assert (doc["rows"], doc["labelled_rows"], doc["rejected"]) == (11, 8, 1)
    assert doc["confusion_matrix"]["counts"] == [list(r) for r in report.confusion]
    assert doc["confusion_matrix"]["labels"] == list(LABEL_NAMES)
    assert [c["name"] for c in doc["per_class"]] == list(LABEL_NAMES)
    assert doc["class_distribution"] == dict(zip(LABEL_NAMES, (4, 3, 3, 1)))

    markdown = paths["report.md"].read_text()
    assert "| accuracy | 0.7500 |" in markdown
    assert "| World | 1.0000 | 0.7500 | 0.8571 | 4 |" in markdown
    assert "| World | 3 | 1 | 0 | 0 |" in markdown  # confusion row

    _assert_png(paths["confusion.png"])


def test_no_labels(ray_session, tmp_path):
    # from_items with only None labels: the column arrives typed as null, not int8.
    items = [{"id": i, "label": None, "pred": p} for i, p in enumerate([0, 3, 3, 1, 3])]
    report = report_from_dataset(ray_session.data.from_items(items), rejected=0)
    assert not report.has_labels
    assert (report.rows, report.labelled_rows, report.accuracy, report.macro_f1) == (
        5,
        0,
        None,
        None,
    )
    assert report.class_distribution == (1, 1, 0, 3)
    assert all(m.precision is None and m.f1 is None for m in report.per_class)

    paths = write_report(report, tmp_path)
    doc = json.loads(paths["report.json"].read_text())
    assert doc["accuracy"] is None and doc["has_labels"] is False
    assert doc["class_distribution"]["Sci/Tech"] == 3
    markdown = paths["report.md"].read_text()
    assert "No labels" in markdown and "accuracy |" not in markdown
    assert "| Sci/Tech | 3 | 60.00% |" in markdown
    values = pq.read_table(paths["report.parquet"]).column("value").to_pylist()
    assert values[-2:] == [None, None]
    _assert_png(paths["confusion.png"])


def test_empty_dataset_gives_zero_counts(ray_session):
    ds = ray_session.data.from_arrow(predictions_table([], []))
    counts = prediction_counts(ds)
    assert counts.rows == 0 and counts.unlabelled == 0
    assert counts.confusion.shape == (NUM_CLASSES, NUM_CLASSES) and counts.confusion.sum() == 0


@pytest.mark.parametrize(
    ("labels", "preds", "message"),
    [
        ([0, 1], [0, 7], "0 bad labels, 1 bad preds"),
        # A raw AG_NEWS label (1..4) must not be mistaken for "no label".
        ([4, None], [0, 0], "1 bad labels, 0 bad preds"),
    ],
)
def test_out_of_range_values_are_errors(ray_session, labels, preds, message):
    ds = ray_session.data.from_arrow(predictions_table(labels, preds))
    # Raised inside a Ray Data task: it reaches the driver wrapped in a RayError.
    with pytest.raises(ray_session.exceptions.RayError, match=message):
        prediction_counts(ds)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def failing_writer(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_atomic(target, failing_writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0  # something was drawn
