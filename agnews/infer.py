"""Bulk classification on Ray Data, and a quick look without Ray.

    read (data.read_dataset)          every input row, bad ones with a reason
    Predictor (map_batches, actors)   tokenize + encode as in training, length-sorted forward
    materialize                       one row out per row in, held in the object store
    write                             OUT/predictions/, OUT/rejected/ (Parquet)
    report (report.py, on Ray)        counted from the predictions (and checked against the rows
                                      written): OUT/report.*, confusion.png
    manifest.json                     counts, checked from the files written:
                                      rows read == predictions + rejected

Everything is written into a temporary folder beside OUT and renamed into place at the end.
The model is loaded on the driver first, so a bad bundle is refused before any work starts;
each actor then loads it once from the same path (on a cluster: a path every node can read).

`classify_texts` runs the same tokenize/encode/forward code in the calling process.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from agnews import __version__
from agnews.checkpoint import CONFIG_FILE, Bundle, BundleError, load_bundle
from agnews.config import PAD_ID
from agnews.data import (
    DEFAULT_MAPPING,
    DEFAULT_MAX_ROW_BYTES,
    REJECTED_COLUMNS,
    ROWS_PER_BLOCK,
    ColumnMapping,
    expand_paths,
    reject_where,
    reraise_data_errors,
)
from agnews.outputs import parquet_rows, publish, temp_folder_beside, write_json_atomic
from agnews.text import Vocab, tokenize

PREDICTIONS_KIND = "agnews-predictions"
LONG_TEXT_MODES = ("truncate", "chunk")
PREDICTION_COLUMNS = ("id", "label", "pred", "pred_name", "confidence", "probs")
REJECTED_OUTPUT_COLUMNS = ("id", *REJECTED_COLUMNS)
RUN_MODEL_DIR = "model"  # where `agnews train` puts the final bundle inside a run folder
DEFAULT_BATCH_ROWS = 4096  # rows per actor call: enough to sort by length and batch well
CPU_FORWARD_ROWS = 256  # rows per forward pass on CPU
GPU_FORWARD_ROWS = 2048
CPUS_PER_ACTOR = 0.5  # fractional: actors holding whole CPUs starve the read tasks on 2 cores
ROWS_PER_FILE = 65_536
MAX_ACTOR_RESTARTS = 3
# Test hook: "N:MARKER" makes a Predictor die (os._exit) on its Nth batch unless MARKER exists;
# it creates MARKER first, so the restarted actor carries on. Read on the driver only.
CRASH_ENV = "AGNEWS_TEST_CRASH_PREDICTOR"


class PredictError(RuntimeError):
    """The job refused to start or finish: OUT exists, too many bad rows, counts that differ."""


# --- the model, ready to classify (no Ray) ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class InferenceModel:
    """A bundle's model on its device, with the vocab and length rules of training."""

    model: torch.nn.Module
    vocab: Vocab
    label_names: tuple[str, ...]
    max_len: int | None
    device: torch.device
    forward_rows: int
    bf16: bool
    int8: bool
    bundle_path: Path | None


def resolve_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder of a training run (RUN/model/) or a bundle folder itself."""
    folder = Path(path).expanduser()
    if (folder / CONFIG_FILE).is_file():
        return folder
    if (folder / RUN_MODEL_DIR / CONFIG_FILE).is_file():
        return folder / RUN_MODEL_DIR
    if not folder.exists():
        raise BundleError(f"{folder}: no such run or bundle folder")
    raise BundleError(
        f"{folder}: not a model bundle (no {CONFIG_FILE}) nor a training run "
        f"(no {RUN_MODEL_DIR}/{CONFIG_FILE})"
    )


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the LSTMs and the head (weights int8, activations float)."""
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao eager quantization deprecated (moving to torchao); it works.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
        )


def inference_model(
    bundle: Bundle | str | os.PathLike,
    *,
    use_gpu: bool = False,
    int8: bool = False,
    forward_rows: int | None = None,
) -> InferenceModel:
    """A loaded bundle (or a run/bundle folder, loaded here) made ready for inference."""
    if int8 and use_gpu:
        raise ValueError("int8 is a CPU mode; on GPU inference runs in bf16")
    device = torch.device("cuda" if use_gpu else "cpu")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(resolve_bundle(bundle), device=device)
    model = bundle.model.to(device).eval()
    if int8:
        model = quantize_int8(model)
    return InferenceModel(
        model=model,
        vocab=Vocab(bundle.itos, (0,) * len(bundle.itos)),
        label_names=tuple(bundle.label_names),
        max_len=bundle.max_len,
        device=device,
        forward_rows=forward_rows or (GPU_FORWARD_ROWS if use_gpu else CPU_FORWARD_ROWS),
        bf16=use_gpu,
        int8=int8,
        bundle_path=bundle.path,
    )


def _padded(values: np.ndarray, offsets: np.ndarray, pick: np.ndarray):
    """Rows `pick` of a flat list array as (ids [B, T] padded with PAD_ID, lengths [B])."""
    starts = offsets[:-1][pick]
    lengths = offsets[1:][pick] - starts
    ids = np.full((len(pick), int(lengths.max())), PAD_ID, dtype=np.int64)
    row_of = np.repeat(np.arange(len(pick)), lengths)
    ends = np.cumsum(lengths)
    col_of = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
    ids[row_of, col_of] = values[np.repeat(starts, lengths) + col_of]
    return torch.from_numpy(ids), torch.from_numpy(lengths.astype(np.int64))


def forward_probs(im: InferenceModel, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Class probabilities (float32 [rows, classes]) of token-id rows given as values + offsets.

    Rows are sorted by length and cut into `forward_rows` slices, so each forward pads only to
    its own longest row (on CUDA the model also packs them). Every row needs >= 1 token.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    probs = np.empty((len(lengths), len(im.label_names)), dtype=np.float32)
    if not len(lengths):
        return probs
    if lengths.min() < 1:
        raise ValueError("every row needs at least one token")
    order = np.argsort(lengths, kind="stable")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if im.bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for start in range(0, len(order), im.forward_rows):
            pick = order[start : start + im.forward_rows]
            ids, row_lengths = _padded(values, offsets, pick)
            logits = im.model(ids.to(im.device, non_blocking=True), row_lengths.to(im.device))
            probs[pick] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs


def class_probabilities(
    im: InferenceModel, tokens: pa.ListArray, long_text: str = "truncate"
) -> np.ndarray:
    """float32 [rows, classes] for token lists (each >= 1 token), as training encodes them.

    truncate: the first `max_len` tokens. chunk: windows of `max_len` tokens, the article's
    probabilities being the mean of its windows'. Without a max_len both read the whole text.
    """
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    cut = im.max_len if long_text == "truncate" else None
    ids = im.vocab.encode(tokens, cut)
    values = pc.list_flatten(ids).to_numpy()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    if long_text == "truncate" or im.max_len is None:
        return forward_probs(im, values, offsets)
    lengths = np.diff(offsets)
    windows = np.maximum(1, -(-lengths // im.max_len))  # ceil; windows tile each row
    window_row = np.repeat(np.arange(len(lengths)), windows)
    first_window = np.repeat(np.cumsum(windows) - windows, windows)
    starts = offsets[:-1][window_row] + (np.arange(len(window_row)) - first_window) * im.max_len
    window_probs = forward_probs(im, values, np.append(starts, offsets[-1]))
    sums = np.zeros((len(lengths), window_probs.shape[1]), dtype=np.float64)
    np.add.at(sums, window_row, window_probs)
    return (sums / windows[:, None]).astype(np.float32)


@dataclass(frozen=True)
class Classification:
    """One text's class, or why it has none."""

    text: str
    pred: int | None
    pred_name: str | None
    confidence: float | None
    probs: dict[str, float] | None
    reason: str | None = None


def classify_texts(
    im: InferenceModel, texts: Sequence[str], long_text: str = "truncate"
) -> list[Classification]:
    """Classes of a few texts in this process (no Ray), with the pipeline's tokenize/encode."""
    tokens = tokenize(pa.array(list(texts), pa.string()))
    has_tokens = pc.greater(pc.list_value_length(tokens), 0).to_numpy(zero_copy_only=False)
    probs = class_probabilities(im, tokens.filter(pa.array(has_tokens)), long_text)
    results, k = [], 0
    for text, ok in zip(texts, has_tokens, strict=True):
        if not ok:
            results.append(Classification(text, None, None, None, None, "no tokens in text"))
            continue
        p = probs[k]
        k += 1
        pred = int(p.argmax())
        results.append(
            Classification(
                text=text,
                pred=pred,
                pred_name=im.label_names[pred],
                confidence=float(p[pred]),
                probs={name: float(v) for name, v in zip(im.label_names, p, strict=True)},
            )
        )
    return results


def predict_table(
    im: InferenceModel,
    batch: pa.Table,
    long_text: str = "truncate",
    keep_columns: Sequence[str] = (),
) -> pa.Table:
    """Reader rows (ROW_SCHEMA + kept columns) -> one output row each, in the same order.

    Classified rows get pred/pred_name/confidence/probs and a null reason; a row the reader
    rejected, or whose text has no token, keeps file/row/reason/raw and null predictions.
    """
    tokens = tokenize(batch["text"])
    batch = reject_where(batch, pc.equal(pc.list_value_length(tokens), 0), "no tokens in text")
    ok = pc.is_null(batch["reason"])
    ok_rows = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
    probs = class_probabilities(im, tokens.take(pa.array(ok_rows, pa.int64())), long_text)

    n, classes = batch.num_rows, len(im.label_names)
    pred = probs.argmax(axis=1)
    mask = ~ok.to_numpy(zero_copy_only=False)  # null where not classified

    def spread(values: np.ndarray, fill) -> np.ndarray:
        full = np.full(n, fill, dtype=values.dtype)
        full[ok_rows] = values
        return full

    flat_probs = np.zeros((n, classes), dtype=np.float32)
    flat_probs[ok_rows] = probs
    prob_lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * classes + 1, classes, dtype=np.int32)),
        pa.array(flat_probs.ravel()),
        mask=pa.array(mask),
    )
    pred_array = pa.array(spread(pred.astype(np.int8), 0), pa.int8(), mask=mask)
    columns = {
        "id": batch["id"],
        "label": batch["label"],
        "pred": pred_array,
        "pred_name": pc.take(pa.array(im.label_names, pa.string()), pred_array),
        "confidence": pa.array(
            spread(probs.max(axis=1, initial=0.0), 0.0), pa.float32(), mask=mask
        ),
        "probs": prob_lists,
        **{c: batch[c] for c in keep_columns},
        "file": batch["file"],
        "row": batch["row"],
        "reason": batch["reason"],
        "raw": batch["raw"],
    }
    return pa.table(columns)


# --- on Ray --------------------------------------------------------------------------------------


class Predictor:
    """map_batches callable class: the bundle is loaded once per actor, then batch after batch."""

    def __init__(
        self,
        bundle_path: str,
        *,
        use_gpu: bool = False,
        int8: bool = False,
        long_text: str = "truncate",
        keep_columns: Sequence[str] = (),
        threads: int = 0,
        forward_rows: int | None = None,
        crash: str | None = None,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.model = inference_model(
            bundle_path, use_gpu=use_gpu, int8=int8, forward_rows=forward_rows
        )
        self.long_text = long_text
        self.keep_columns = tuple(keep_columns)
        self.batches = 0
        self.crash = crash

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.crash:
            self._crash_once()
        return predict_table(self.model, batch, self.long_text, self.keep_columns)

    def _crash_once(self) -> None:
        on_batch, marker = self.crash.split(":", 1)
        if self.batches == int(on_batch) and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # an actor dying mid-job, as a lost node or an OOM kill would


def _classified_only(batch: pa.Table, keep_columns: list[str]) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select([*PREDICTION_COLUMNS, *keep_columns])


def _rejected_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"])).select(list(REJECTED_OUTPUT_COLUMNS))


# --- the job -------------------------------------------------------------------------------------


def predict(
    inputs: Sequence[str] | str,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    mapping: ColumnMapping | None = None,
    batch_size: int = DEFAULT_BATCH_ROWS,
    workers: int | None = None,
    use_gpu: bool | None = None,
    long_text: str = "truncate",
    keep_columns: Sequence[str] = (),
    overwrite: bool = False,
    int8: bool = False,
    threads: int = 0,
    max_rejected_fraction: float = 0.01,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    log: Callable[[str], Any] = print,
) -> dict:
    """Classifies every row of `inputs` with the bundle of `model` into OUT; returns the manifest.

    `model`: a training run folder (its model/) or a bundle folder. `workers`: inference actors
    (default: one per GPU, else one per CPU). `use_gpu`: None uses GPUs when Ray has them.
    `threads`: torch threads per actor (0: the cluster's CPUs / workers). Raises BundleError,
    DataError or PredictError with a message that names the file, row or setting at fault.
    """
    import ray

    from agnews.data import read_dataset
    from agnews.report import PredictionCounts, compute_report, prediction_counts, write_report
    from agnews.runtime import connect, quiet_data

    started = time.perf_counter()
    if long_text not in LONG_TEXT_MODES:
        raise PredictError(f"--long-text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise PredictError(f"max rejected fraction must be in [0, 1], got {max_rejected_fraction}")
    keep_columns = list(dict.fromkeys(keep_columns))
    clash = [c for c in keep_columns if c in PREDICTION_COLUMNS]
    if clash:
        raise PredictError(f"cannot keep column(s) {clash}: predictions use these names")
    given_mapping = None if mapping is None else {**asdict(mapping), "keep": keep_columns}
    mapping = replace(mapping or DEFAULT_MAPPING, keep=tuple(keep_columns))
    out_path = Path(out).expanduser().absolute()
    if out_path.exists() and not overwrite:
        raise PredictError(f"{out_path} exists; pass --overwrite to replace it")

    # Refuse a bad bundle here, before any Ray work (load_bundle checks its files agree).
    bundle_path = resolve_bundle(model).absolute()
    bundle = load_bundle(bundle_path)
    if int8:
        quantize_int8(bundle.model)  # fails here, not in every actor, where unsupported
    items = [{"path": p, "name": n, "source": "input"} for p, n in expand_paths(inputs)]

    connect()
    quiet_data()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if use_gpu is None:
        use_gpu = gpus > 0 and not int8
    if use_gpu and gpus == 0:
        raise PredictError("--gpu asked for, but the Ray cluster has no GPU")
    if use_gpu and int8:
        raise PredictError("--int8 is a CPU mode; pass --no-gpu with it")
    # CPU: one single-threaded actor per CPU. Two torch threads in one actor spin-wait for each
    # other whenever a read task or another job takes a core, and then run several times slower.
    workers = workers or (gpus if use_gpu else max(1, int(cpus)))
    threads = threads or max(1, min(os.cpu_count() or 1, int(cpus // workers)))
    crash = os.environ.get(CRASH_ENV) or None

    tmp = temp_folder_beside(out_path)
    seconds: dict[str, float] = {}
    try:
        t = time.perf_counter()
        with reraise_data_errors(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            # A small input has fewer blocks than actors: harmless, and not the user's doing.
            warnings.filterwarnings("ignore", "The minimum number of concurrent actors")
            rows = read_dataset(items, fmt, mapping, max_row_bytes=max_row_bytes)
            if batch_size < ROWS_PER_BLOCK:
                # One batch per actor task: the actors share the last blocks evenly and none
                # waits idle while another finishes a long block.
                rows = rows.repartition(target_num_rows_per_block=batch_size)
            predicted = rows.map_batches(
                Predictor,
                fn_constructor_kwargs={
                    "bundle_path": str(bundle_path),
                    "use_gpu": use_gpu,
                    "int8": int8,
                    "long_text": long_text,
                    "keep_columns": keep_columns,
                    "threads": threads,
                    "crash": crash,
                },
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=CPUS_PER_ACTOR,
                num_gpus=1 if use_gpu else 0,
                **_actor_retries(),
            ).materialize()
        seconds["read_predict"] = time.perf_counter() - t

        t = time.perf_counter()
        rows_read = predicted.count()  # block metadata: the Predictor gives one row per row in
        if rows_read == 0:
            raise PredictError("no rows read: the input files are empty")
        classified = predicted.map_batches(
            _classified_only,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"keep_columns": keep_columns},
        )
        _write_parquet(classified, tmp / "predictions", _predictions_schema(keep_columns))
        _write_parquet(
            predicted.map_batches(_rejected_only, batch_size=None, batch_format="pyarrow"),
            tmp / "rejected",
            _rejected_schema(),
        )
        written = {name: parquet_rows(tmp / name) for name in ("predictions", "rejected")}
        summary = _summarise_rejected(tmp / "rejected", rows_read)
        _check_accounting(summary, written)
        _check_rejected(summary, max_rejected_fraction)
        seconds["write"] = time.perf_counter() - t

        t = time.perf_counter()
        if written["predictions"]:
            counts = prediction_counts(classified)
        else:
            classes = len(bundle.label_names)
            counts = PredictionCounts(
                np.zeros((classes, classes), np.int64), np.zeros(classes, np.int64), 0
            )
        if counts.rows != written["predictions"]:
            raise PredictError(
                f"the report counted {counts.rows:,} predictions; "
                f"{written['predictions']:,} were written"
            )
        report = compute_report(counts, rejected=written["rejected"])
        write_report(report, tmp)
        seconds["report"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - started

        manifest = {
            "kind": PREDICTIONS_KIND,
            "version": 1,
            "agnews_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": str(bundle_path),
            "model_metrics": bundle.metrics,
            "inputs": [str(p) for p in ([inputs] if isinstance(inputs, str) else inputs)],
            "files": [{"path": i["path"], "name": i["name"]} for i in items],
            "format": fmt,
            "mapping": given_mapping,  # None: the reader's defaults (AG_NEWS, or `text`)
            "long_text": long_text,
            "max_len": bundle.max_len,
            "keep_columns": keep_columns,
            "rows_read": summary["rows_read"],
            "predictions": written["predictions"],
            "rejected": written["rejected"],
            "rejected_by_reason": summary["rejected_by_reason"],
            "rejected_by_file": summary["rejected_by_file"],
            "has_labels": report.has_labels,
            "labelled_rows": report.labelled_rows,
            "accuracy": report.accuracy,
            "macro_f1": report.macro_f1,
            "class_distribution": dict(
                zip(report.label_names, report.class_distribution, strict=True)
            ),
            "workers": workers,
            "threads_per_worker": threads,
            "use_gpu": use_gpu,
            "int8": int8,
            "batch_size": batch_size,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "articles_per_s": round(summary["rows_read"] / seconds["total"], 1),
            "versions": {
                "python": platform.python_version(),
                "ray": ray.__version__,
                "pyarrow": pa.__version__,
                "torch": torch.__version__,
            },
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        publish(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quality = (
        f"accuracy {report.accuracy:.4f} on {report.labelled_rows:,} labelled rows"
        if report.has_labels
        else "no labels: "
        + ", ".join(f"{k} {v:,}" for k, v in manifest["class_distribution"].items())
    )
    log(
        f"predicted {out_path}: {written['predictions']:,} predictions + "
        f"{written['rejected']:,} rejected = {summary['rows_read']:,} rows read; {quality} "
        f"({seconds['total']:.1f} s, {manifest['articles_per_s']:,.0f} articles/s)"
    )
    return manifest


def _actor_retries() -> dict:
    """A dead actor is restarted and its batch retried, so each row still leaves once; bounded,
    so that an actor that dies every time (a bad node, a broken install) ends the job.

    Ray Data's own default is unbounded. Ray 2.60 deprecates passing these (no named parameter
    replaces them yet); the warning is silenced here, where the reason is written down.
    """
    return {"max_restarts": MAX_ACTOR_RESTARTS, "max_task_retries": MAX_ACTOR_RESTARTS}


def _predictions_schema(keep_columns: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("label", pa.int8()),
            ("pred", pa.int8()),
            ("pred_name", pa.string()),
            ("confidence", pa.float32()),
            ("probs", pa.list_(pa.float32())),
            *((c, pa.string()) for c in keep_columns),
        ]
    )


def _rejected_schema() -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("file", pa.string()),
            ("row", pa.int64()),
            ("reason", pa.string()),
            ("raw", pa.binary()),
        ]
    )


def _summarise_rejected(folder: Path, rows_read: int, shown: int = 5) -> dict:
    """Rejected rows by reason and by file, and the first few, read back from rejected/.

    Batch by batch, so a job with millions of bad rows does not hold them all on the driver.
    """
    by_reason: dict[str, int] = {}
    by_file: dict[str, int] = {}
    first: list[dict] = []
    for path in sorted(folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["file", "row", "reason"]):
            if len(first) < shown:
                first += batch.slice(0, shown - len(first)).to_pylist()
            # "label 'x' is not 1-4" stays whole; "row too large (...)" and "malformed CSV: ..."
            # are counted by their kind.
            kinds = pc.replace_substring_regex(batch["reason"], r" \(.*$|:.*$", "")
            table = pa.table({"kind": kinds, "file": batch["file"]})
            for column, totals in (("kind", by_reason), ("file", by_file)):
                counted = pc.value_counts(table[column])
                for value, n in zip(
                    counted.field("values").to_pylist(), counted.field("counts").to_pylist()
                ):
                    totals[value] = totals.get(value, 0) + n
    rejected = sum(by_reason.values())
    return {
        "rows_read": rows_read,
        "accepted": rows_read - rejected,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "rejected_by_file": by_file,
        "first_rejected": first,
    }


def _check_rejected(summary: dict, max_fraction: float) -> None:
    read, rejected = summary["rows_read"], summary["rejected"]
    if rejected / read <= max_fraction:
        return
    files = ", ".join(f"{f} ({n:,})" for f, n in summary["rejected_by_file"].items())
    shown = "\n".join(
        f"  {r['file']}, row {r['row']}: {r['reason']}" for r in summary["first_rejected"]
    )
    raise PredictError(
        f"{rejected:,} of {read:,} rows cannot be classified ({rejected / read:.1%} > "
        f"--max-rejected-fraction {max_fraction:g}) in {files}. First bad rows:\n{shown}"
    )


def _write_parquet(ds, folder: Path, schema: pa.Schema) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(folder), min_rows_per_file=ROWS_PER_FILE)
    if not any(folder.glob("*.parquet")):
        # No rows of this kind: one empty file keeps the folder readable with its schema.
        pq.write_table(schema.empty_table(), folder / "empty.parquet")


def _check_accounting(summary: dict, written: dict) -> None:
    """rows read == predictions + rejected, counted again from the files written."""
    if written["predictions"] != summary["accepted"] or written["rejected"] != summary["rejected"]:
        raise PredictError(
            f"wrote {written['predictions']:,} predictions and {written['rejected']:,} rejected "
            f"rows; expected {summary['accepted']:,} and {summary['rejected']:,}"
        )
    if written["predictions"] + written["rejected"] != summary["rows_read"]:
        raise PredictError(
            f"rows read {summary['rows_read']:,} != predictions {written['predictions']:,} "
            f"+ rejected {written['rejected']:,}"
        )
