"""Metrics from a predictions dataset, and the report files written from them.

The counting runs on Ray: each block becomes one tiny row of partial counts
(`map_batches` + `np.bincount`), and only those rows reach the driver. A
`groupby(["label", "pred"]).count()` would do the same sum through a shuffle
(hash partitioning, more tasks, sort/merge), which on two cores costs far more
than the counting itself; per-block bincount is one pass with no data exchange.

Division by zero gives 0.0 (sklearn's `zero_division=0`): precision of a class
never predicted, recall of a class with no support, F1 when both are 0. Macro F1
is the unweighted mean over all NUM_CLASSES classes, absent ones included. With
no labelled rows at all, accuracy, macro F1 and per-class P/R/F1 are None (null
in JSON and Parquet): they are undefined, not zero, and the report shows the
prediction distribution instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from agnews.config import LABEL_NAMES, NUM_CLASSES

if TYPE_CHECKING:
    import ray.data

# Partial counts are a (NUM_CLASSES + 1) x NUM_CLASSES grid flattened into one list:
# rows are the true label, plus one last row for "no label"; columns are the prediction.
_UNLABELLED_SLOT = NUM_CLASSES
_CELLS = (NUM_CLASSES + 1) * NUM_CLASSES

REPORT_FILES = ("report.parquet", "report.json", "report.md", "confusion.png")


@dataclass(frozen=True, eq=False)
class PredictionCounts:
    """Counts over a predictions dataset (eq=False: numpy arrays have no plain ==)."""

    confusion: np.ndarray  # int64 [NUM_CLASSES, NUM_CLASSES]; rows = true label, cols = prediction
    predicted: np.ndarray  # int64 [NUM_CLASSES]; prediction counts over ALL rows
    unlabelled: int  # rows whose label is null

    @property
    def rows(self) -> int:
        return int(self.predicted.sum())

    @property
    def labelled(self) -> int:
        return int(self.confusion.sum())


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float | None  # None when there are no labelled rows at all
    recall: float | None
    f1: float | None
    support: int  # labelled rows whose true label is this class
    predicted: int  # all rows predicted as this class (labelled or not)


@dataclass(frozen=True)
class Report:
    label_names: tuple[str, ...]
    rows: int  # prediction rows, labelled or not
    labelled_rows: int
    rejected: int  # input rows that never reached prediction (passed in by the caller)
    accuracy: float | None  # None without labelled rows
    macro_f1: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows = true label, cols = prediction
    class_distribution: tuple[int, ...]  # prediction counts over all rows

    @property
    def unlabelled_rows(self) -> int:
        return self.rows - self.labelled_rows

    @property
    def has_labels(self) -> bool:
        return self.labelled_rows > 0


def _partial_counts(batch: pa.Table) -> pa.Table:
    """One block -> one row holding its flattened (label slot, prediction) counts."""
    # Cast first: an all-null label column may arrive typed as pa.null().
    labels_col = batch.column("label").cast(pa.int64())
    unlabelled = pc.is_null(labels_col).to_numpy()
    labels = pc.fill_null(labels_col, 0).to_numpy()
    preds_col = batch.column("pred").cast(pa.int64())
    if preds_col.null_count:
        raise ValueError(f"pred has {preds_col.null_count} null values; every row needs one")
    preds = preds_col.to_numpy()
    # Checked before nulls take the extra slot: a raw 1..4 label must not pass as "no label".
    bad_labels = ~unlabelled & ((labels < 0) | (labels >= NUM_CLASSES))
    bad_preds = (preds < 0) | (preds >= NUM_CLASSES)
    if bad_labels.any() or bad_preds.any():
        raise ValueError(
            f"label must be null or 0..{NUM_CLASSES - 1} and pred 0..{NUM_CLASSES - 1}; "
            f"found {int(bad_labels.sum())} bad labels, {int(bad_preds.sum())} bad preds"
        )
    labels = np.where(unlabelled, _UNLABELLED_SLOT, labels)
    counts = np.bincount(labels * NUM_CLASSES + preds, minlength=_CELLS)
    return pa.table({"counts": pa.array([counts.tolist()], type=pa.list_(pa.int64()))})


def prediction_counts(ds: ray.data.Dataset) -> PredictionCounts:
    """Confusion matrix, prediction distribution and unlabelled count in one pass on Ray."""
    partial = ds.select_columns(["label", "pred"]).map_batches(
        _partial_counts, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )
    total = np.zeros(_CELLS, dtype=np.int64)
    # Only one small row per block comes back to the driver.
    for batch in partial.iter_batches(batch_format="pyarrow", batch_size=None):
        for counts in batch.column("counts").to_pylist():
            total += np.asarray(counts, dtype=np.int64)
    grid = total.reshape(NUM_CLASSES + 1, NUM_CLASSES)
    return PredictionCounts(
        confusion=grid[:NUM_CLASSES].copy(),
        predicted=grid.sum(axis=0),
        unlabelled=int(grid[_UNLABELLED_SLOT].sum()),
    )


def confusion_counts(ds: ray.data.Dataset) -> np.ndarray:
    """int64 [NUM_CLASSES, NUM_CLASSES], rows = true label, cols = prediction; labelled rows."""
    return prediction_counts(ds).confusion


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def compute_report(counts: PredictionCounts, rejected: int = 0) -> Report:
    """Accuracy, macro F1 and per-class precision/recall/F1 from the counts."""
    confusion = np.asarray(counts.confusion, dtype=np.int64)
    if confusion.shape != (NUM_CLASSES, NUM_CLASSES):
        raise ValueError(f"confusion must be {NUM_CLASSES}x{NUM_CLASSES}, got {confusion.shape}")
    labelled = int(confusion.sum())
    correct = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted_labelled = confusion.sum(axis=0)
    per_class = []
    f1s = []
    for c, name in enumerate(LABEL_NAMES):
        if labelled:
            precision = _ratio(correct[c], predicted_labelled[c])
            recall = _ratio(correct[c], support[c])
            f1 = _ratio(2 * precision * recall, precision + recall)
            f1s.append(f1)
        else:
            precision = recall = f1 = None
        per_class.append(
            ClassMetrics(
                name=name,
                precision=precision,
                recall=recall,
                f1=f1,
                support=int(support[c]),
                predicted=int(counts.predicted[c]),
            )
        )
    return Report(
        label_names=tuple(LABEL_NAMES),
        rows=counts.rows,
        labelled_rows=labelled,
        rejected=int(rejected),
        accuracy=_ratio(correct.sum(), labelled) if labelled else None,
        macro_f1=float(np.mean(f1s)) if labelled else None,
        per_class=tuple(per_class),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        class_distribution=tuple(int(v) for v in counts.predicted),
    )


def report_from_dataset(ds: ray.data.Dataset, rejected: int = 0) -> Report:
    return compute_report(prediction_counts(ds), rejected=rejected)


# ---- files ---------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def report_table(report: Report) -> pa.Table:
    """One row per class (kind="class") plus accuracy and macro_f1 rows (kind="overall").

    Class rows fill precision/recall/f1/support/predicted and leave value null;
    overall rows fill value (and support = labelled rows) and leave the rest null.
    """
    kinds, names, precision, recall, f1, support, predicted, value = ([] for _ in range(8))
    for m in report.per_class:
        kinds.append("class")
        names.append(m.name)
        precision.append(m.precision)
        recall.append(m.recall)
        f1.append(m.f1)
        support.append(m.support)
        predicted.append(m.predicted)
        value.append(None)
    for name, metric in (("accuracy", report.accuracy), ("macro_f1", report.macro_f1)):
        kinds.append("overall")
        names.append(name)
        precision.append(None)
        recall.append(None)
        f1.append(None)
        support.append(report.labelled_rows)
        predicted.append(None)
        value.append(metric)
    return pa.table(
        {
            "kind": pa.array(kinds, pa.string()),
            "name": pa.array(names, pa.string()),
            "precision": pa.array(precision, pa.float64()),
            "recall": pa.array(recall, pa.float64()),
            "f1": pa.array(f1, pa.float64()),
            "support": pa.array(support, pa.int64()),
            "predicted": pa.array(predicted, pa.int64()),
            "value": pa.array(value, pa.float64()),
        }
    )


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON document: counts, overall metrics, per-class metrics, confusion matrix."""
    return {
        "rows": report.rows,
        "labelled_rows": report.labelled_rows,
        "unlabelled_rows": report.unlabelled_rows,
        "rejected": report.rejected,
        "has_labels": report.has_labels,
        "accuracy": report.accuracy,
        "macro_f1": report.macro_f1,
        "label_names": list(report.label_names),
        "per_class": [
            {
                "name": m.name,
                "precision": m.precision,
                "recall": m.recall,
                "f1": m.f1,
                "support": m.support,
                "predicted": m.predicted,
            }
            for m in report.per_class
        ],
        "class_distribution": dict(zip(report.label_names, report.class_distribution)),
        "confusion_matrix": {
            "rows": "true label",
            "columns": "prediction",
            "labels": list(report.label_names),
            "counts": [list(row) for row in report.confusion],
        },
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_markdown(report: Report) -> str:
    names = report.label_names
    lines = ["# Classification report", ""]
    lines += [
        "| measure | value |",
        "|---|---:|",
        f"| rows | {report.rows} |",
        f"| labelled rows | {report.labelled_rows} |",
        f"| rejected rows | {report.rejected} |",
    ]
    if report.has_labels:
        lines += [
            f"| accuracy | {_fmt(report.accuracy)} |",
            f"| macro F1 | {_fmt(report.macro_f1)} |",
        ]
        lines += ["", "## Per class", ""]
        lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {m.name} | {_fmt(m.precision)} | {_fmt(m.recall)} | {_fmt(m.f1)} | {m.support} |"
            for m in report.per_class
        ]
        lines += ["", "## Confusion matrix (rows: true label, columns: prediction)", ""]
        lines += ["| true \\ pred | " + " | ".join(names) + " |"]
        lines += ["|---|" + "---:|" * len(names)]
        lines += [
            f"| {name} | " + " | ".join(str(v) for v in row) + " |"
            for name, row in zip(names, report.confusion)
        ]
    else:
        lines += ["", "No labels in the input: accuracy and per-class metrics cannot be computed."]
    lines += ["", "## Predicted class distribution (all rows)", ""]
    lines += ["| class | rows | share |", "|---|---:|---:|"]
    for name, count in zip(names, report.class_distribution):
        lines.append(f"| {name} | {count} | {_ratio(count, report.rows):.2%} |")
    return "\n".join(lines) + "\n"


def _draw_figure(report: Report):
    # Figure without pyplot: no global state, no display, renders with Agg.
    from matplotlib.figure import Figure

    names = report.label_names
    fig = Figure(figsize=(6.4, 5.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    if not report.has_labels:
        ax.bar(names, report.class_distribution, color="tab:blue")
        for i, count in enumerate(report.class_distribution):
            ax.annotate(str(count), (i, count), ha="center", va="bottom")
        ax.set_ylabel("rows")
        ax.set_title(f"No labels: predicted class distribution ({report.rows} rows)")
        return fig
    confusion = np.asarray(report.confusion, dtype=np.int64)
    # Colour by share of the true class, so a small class is as readable as a big one.
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{confusion[i, j]}\n{shares[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if shares[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(
        f"Confusion matrix, {report.labelled_rows} labelled rows\n"
        f"accuracy {report.accuracy:.2%}, macro F1 {report.macro_f1:.3f}"
    )
    return fig


def write_report(report: Report, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.parquet, report.json, report.md and confusion.png into out_dir.

    Each file appears whole or not at all (temporary name, then os.replace). Without
    labels, confusion.png shows the predicted class distribution instead.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    table = report_table(report)
    _write_atomic(paths["report.parquet"], lambda p: pq.write_table(table, p))
    text = json.dumps(report_dict(report), indent=2) + "\n"
    _write_atomic(paths["report.json"], lambda p: p.write_text(text, encoding="utf-8"))
    markdown = report_markdown(report)
    _write_atomic(paths["report.md"], lambda p: p.write_text(markdown, encoding="utf-8"))
    figure = _draw_figure(report)
    _write_atomic(paths["confusion.png"], lambda p: figure.savefig(p, format="png"))
    return paths
