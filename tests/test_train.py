"""Ray Train wrapper: real 2-worker CPU runs on tiny generated prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from agnews.checkpoint import load_bundle
from agnews.config import TrainConfig
from agnews.train import PreparedDataError, TrainError, fit, read_prepared

VOCAB = 48
MODEL = {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.1}


def write_prepared(folder: Path, train_rows: int = 480, val_rows: int = 160) -> Path:
    """A prepared folder in the `agnews prepare` format with class-dependent token ids."""
    rng = np.random.default_rng(0)
    itos = ["<pad>", "<unk>"] + [f"tok{i}" for i in range(VOCAB - 2)]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({"itos": itos, "counts": [0] * VOCAB}))
    splits = {}
    for split, rows in (("train", train_rows), ("val", val_rows), ("test", 40)):
        labels = rng.integers(0, 4, rows)
        ids = []
        for label in labels:
            length = int(rng.integers(3, 16))
            topic = rng.integers(2 + 10 * label, 12 + 10 * label, length)
            ids.append(np.where(rng.random(length) < 0.6, topic, rng.integers(42, VOCAB, length)))
        table = pa.table(
            {
                "id": [f"{split}-{i}" for i in range(rows)],
                "label": pa.array(labels, pa.int8()),
                "ids": pa.array([list(map(int, r)) for r in ids], pa.list_(pa.int32())),
                "length": pa.array([len(r) for r in ids], pa.int32()),
            }
        )
        (folder / split).mkdir()
        pq.write_table(table.slice(0, rows // 2), folder / split / "part-0.parquet")
        pq.write_table(table.slice(rows // 2), folder / split / "part-1.parquet")
        splits[split] = {"rows": rows}
    manifest = {"kind": "agnews-prepared", "max_len": 64, "vocab_size": VOCAB, "splits": splits}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prep") / "prepared")


def settings(**overrides) -> TrainConfig:
    options = dict(epochs=3, batch_size=32, lr=1e-2, workers=2, bucket=2, eval_batch_size=64)
    options.update(overrides)
    return TrainConfig(**options)


def epochs_of(history: list[dict]) -> list[int]:
    return [row["epoch"] for row in history]


def test_two_workers_learn_and_write_the_run_folder(ray_session, prepared, tmp_path):
    result = fit(prepared, tmp_path / "run", settings(), MODEL)

    history = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert history == result.history and epochs_of(history) == [1, 2, 3]
    for row in history:
        assert row["workers"] == 2
        assert row["val_rows"] == 160  # all of val, from both workers' shards
        assert row["train_rows"] == 480
        assert row["samples_per_s"] > 0 and row["seconds"] > 0
    assert history[-1]["val_accuracy"] > 0.8  # chance is 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    bundle = load_bundle(result.model_dir)
    assert result.model_dir == tmp_path / "run/model"
    best = max(history, key=lambda row: row["val_accuracy"])
    assert bundle.metrics["val_accuracy"] == best["val_accuracy"]
    assert bundle.model_config.vocab_size == VOCAB and bundle.max_len == 64
    assert (tmp_path / "run/model/vocab.json").read_bytes() == (
        prepared / "vocab.json"
    ).read_bytes()


def test_ddp_gradients_are_equal_across_workers(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from agnews.train import ddp_gradient_probe

    trainer = TorchTrainer(
        ddp_gradient_probe,
        train_loop_config={"model": {"vocab_size": VOCAB, **MODEL}, "rows": 8},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path)),
    )
    metrics = trainer.fit().return_value
    assert metrics["workers"] == 2
    assert metrics["grad_norm"] > 0
    assert metrics["max_local_difference"] > 1e-4  # the ranks saw different batches ...
    assert metrics["max_rank_difference"] == 0.0  # ... yet hold the same gradients
    assert metrics["max_mean_difference"] < 1e-6  # which are the mean of the local ones


def test_a_worker_killed_mid_run_is_replaced_and_resumes(ray_session, prepared, tmp_path):
    run = tmp_path / "run"
    result = fit(prepared, run, settings(), MODEL, hooks={"crash_epoch": 2, "crash_rank": 1})

    assert (run / ".crashed-rank1-epoch2").exists()  # rank 1 did die in epoch 2
    assert epochs_of(result.history) == [1, 2, 3]
    # The replacement workers started from the epoch-1 checkpoint, not from scratch.
    assert [row["started_from_epoch"] for row in result.history] == [0, 1, 1]
    assert result.history[-1]["val_accuracy"] > 0.8
    load_bundle(result.model_dir)


def test_running_again_resumes_an_interrupted_run(ray_session, prepared, tmp_path):
    # With --sparse-embedding: DDP all-reduces sparse gradients, LazyAdamW's state round-trips.
    run = tmp_path / "run"
    with pytest.raises(Exception, match="failing after epoch 1"):
        fit(
            prepared,
            run,
            settings(max_failures=0, sparse_embedding=True),
            MODEL,
            hooks={"fail_after_epoch": 1},
        )
    assert not (run / "model").exists()
    assert epochs_of(
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ) == [1]

    result = fit(prepared, run, settings(sparse_embedding=True), MODEL)
    assert epochs_of(result.history) == [1, 2, 3]
    assert [row["started_from_epoch"] for row in result.history] == [0, 1, 1]
    assert result.history[-1]["val_accuracy"] > 0.8

    with pytest.raises(TrainError, match="run.json.*started with model"):
        fit(prepared, run, settings(), {**MODEL, "hidden_dim": 8})


def test_missing_or_foreign_prepared_folder_is_refused(tmp_path):
    with pytest.raises(PreparedDataError, match="no such prepared folder"):
        fit(tmp_path / "nowhere", tmp_path / "run")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(PreparedDataError, match="manifest.json: missing"):
        fit(tmp_path / "foreign", tmp_path / "run")
    (tmp_path / "foreign/manifest.json").write_text(json.dumps({"kind": "photos"}))
    with pytest.raises(PreparedDataError, match="not an agnews prepared manifest"):
        fit(tmp_path / "foreign", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_vocab_and_model_mismatch_is_refused(prepared, tmp_path):
    with pytest.raises(PreparedDataError, match="vocab_size=999.*48 tokens"):
        fit(prepared, tmp_path / "run", settings(), {**MODEL, "vocab_size": 999})

    broken = write_prepared(tmp_path / "broken", train_rows=8, val_rows=8)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 50}))
    with pytest.raises(PreparedDataError, match="vocab.json: 48 tokens.*vocab_size=50"):
        read_prepared(broken)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_where_none_exists_is_refused(ray_session, prepared, tmp_path):
    with pytest.raises(TrainError, match="GPU"):
        fit(prepared, tmp_path / "run", settings(use_gpu=True), MODEL)
