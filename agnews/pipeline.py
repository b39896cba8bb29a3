"""The whole job: prepare -> train -> predict (the test split) -> report, under one output root.

    OUT/prepared/      agnews prepare's folder (Parquet splits, vocab.json, manifest.json)
    OUT/run/           agnews train's run folder (metrics.jsonl, checkpoints, model/)
    OUT/predict/       agnews predict's folder on the test file (predictions/, report.*)
    OUT/summary.json   accuracy, rows, seconds per stage, versions

Running it again on the same OUT goes on where it stopped: a finished prepared/ is reused (its
manifest is written last, so it exists only when complete), an interrupted training run
resumes from its latest checkpoint, and predict/ is written again.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agnews import __version__
from agnews.config import PrepareConfig, TrainConfig
from agnews.outputs import write_json_atomic

SUMMARY_FILE = "summary.json"


def run(
    data_dir: str | None,
    out: str,
    *,
    prepare_config: PrepareConfig | None = None,
    train_config: TrainConfig | None = None,
    model: Mapping[str, Any] | None = None,
    predict_options: Mapping[str, Any] | None = None,
    address: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> dict:
    """Runs the stages in order into OUT; returns the summary (also OUT/summary.json).

    `data_dir`: a folder with train.csv and test.csv in the AG_NEWS format; None downloads
    AG_NEWS into the cache (MD5-checked). `overwrite`: prepare again even if OUT/prepared is
    complete. `predict_options`: keyword arguments for `infer.predict` (batch_size, workers...).
    """
    from agnews import infer, runtime, train
    from agnews.config import PREPARED_KIND
    from agnews.data import DEFAULT_CACHE, ag_news_files, download_ag_news
    from agnews.prepare import load_manifest, prepare_ag_news

    prepare_config = prepare_config or PrepareConfig()
    train_config = train_config or TrainConfig()
    root = Path(out).expanduser().absolute()
    prepared, run_dir, predicted = root / "prepared", root / "run", root / "predict"
    data_dir = data_dir or str(download_ag_news(DEFAULT_CACHE))
    test_file = ag_news_files(data_dir)["test"]  # fails early on a wrong --data
    runtime.connect(address)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    manifest_file = prepared / "manifest.json"
    if manifest_file.exists() and not overwrite:
        manifest = load_manifest(prepared)
        if manifest.get("config") != asdict(prepare_config):
            log(f"note: {prepared} was prepared with {manifest.get('config')}; reusing it")
        log(f"[1/3] prepare: reusing {prepared} ({manifest['rows_read']:,} rows)")
    else:
        log(f"[1/3] prepare: {data_dir} -> {prepared}")
        manifest = prepare_ag_news(data_dir, str(prepared), prepare_config, overwrite=True, log=log)
    assert manifest["kind"] == PREPARED_KIND
    seconds["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[2/3] train: {prepared} -> {run_dir}")
    result = train.fit(prepared, run_dir, train_config, model)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[3/3] predict: {test_file} -> {predicted}")
    options = {"fmt": "ag_news", **dict(predict_options or {})}
    predictions = infer.predict(
        [test_file], result.model_dir, predicted, overwrite=True, log=log, **options
    )
    seconds["predict"] = time.perf_counter() - t

    import ray
    import torch

    summary = {
        "kind": "agnews-run",
        "agnews_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(data_dir),
        "accuracy": predictions["accuracy"],
        "macro_f1": predictions["macro_f1"],
        "val_accuracy": result.metrics.get("val_accuracy"),
        "epochs": len(result.history),
        "rows": {
            "read": manifest["rows_read"],
            "train": manifest["splits"]["train"]["rows"],
            "val": manifest["splits"]["val"]["rows"],
            "test": manifest["splits"]["test"]["rows"],
            "rejected": manifest["rejected"]["rows"],
            "predicted": predictions["predictions"],
            "predict_rejected": predictions["rejected"],
        },
        "vocab_size": manifest["vocab_size"],
        "paths": {
            "prepared": str(prepared),
            "run": str(run_dir),
            "model": str(result.model_dir),
            "predict": str(predicted),
        },
        "config": {
            "prepare": asdict(prepare_config),
            "train": asdict(train_config),
            "model": dict(model or {}),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "versions": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
        },
    }
    write_json_atomic(root / SUMMARY_FILE, summary)
    log(
        f"done: test accuracy {summary['accuracy']:.4f} on {predictions['labelled_rows']:,} "
        f"articles; {root / SUMMARY_FILE}"
    )
    return summary
