"""Ray Train wrapper around the plain epoch loop (loop.py): `fit()` on the driver,
`train_loop_per_worker()` on each worker.

RUN/ (the `out` folder) after a run:

- `metrics.jsonl`: one JSON line per epoch (train/val loss and accuracy over all workers,
  samples/s, seconds), also printed as training goes.
- `ray/`: Ray Train's run folder (checkpoints: each one a model bundle + `train_state.pt`).
  Ray Train keeps the best checkpoint by val accuracy and the latest.
- `model/`: the final bundle (checkpoint.save_bundle) from the best checkpoint.
- `run.json`: the settings the run started with; running again on the same RUN resumes
  from the latest checkpoint (Ray Train V2 reloads its snapshot when `RunConfig(name,
  storage_path)` are the same), and refuses settings that would change the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from agnews import checkpoint as ckpt
from agnews import loop
from agnews.config import LABEL_NAMES, PREPARED_KIND, TrainConfig
from agnews.model import LSTMClassifier, ModelConfig

RAY_RUN_NAME = "ray"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
MODEL_DIR = "model"
SCORE = "val_accuracy"


class TrainError(RuntimeError):
    """A training run cannot start: bad input folder, settings, or resources."""


class PreparedDataError(TrainError, ValueError):
    """The prepared folder is missing, foreign, or inconsistent."""


# --- the prepared folder ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """What training needs to know about a prepared folder (written by `agnews prepare`)."""

    path: Path
    vocab_path: Path
    vocab_size: int
    max_len: int | None
    rows: dict[str, int]

    def split_dir(self, split: str) -> Path:
        return self.path / split


def read_prepared(path: str | os.PathLike, splits: Iterable[str] = ("train", "val")) -> Prepared:
    """Check a prepared folder and read its manifest; PreparedDataError names what is wrong."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise PreparedDataError(f"{path}: no such prepared folder (run `agnews prepare` first)")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise PreparedDataError(
            f"{manifest_file}: missing; {path} is not a folder written by `agnews prepare`"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError as e:
        raise PreparedDataError(f"{manifest_file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != PREPARED_KIND:
        raise PreparedDataError(
            f"{manifest_file}: not an agnews prepared manifest (kind != {PREPARED_KIND!r})"
        )
    vocab_path = path / "vocab.json"
    if not vocab_path.is_file():
        raise PreparedDataError(f"{vocab_path}: missing")
    try:
        itos = json.loads(vocab_path.read_text())["itos"]
    except (ValueError, KeyError, TypeError) as e:
        raise PreparedDataError(f"{vocab_path}: not a vocab file (want 'itos')") from e
    if manifest.get("vocab_size") != len(itos):
        raise PreparedDataError(
            f"{vocab_path}: {len(itos)} tokens, but {manifest_file} says vocab_size="
            f"{manifest.get('vocab_size')}"
        )
    rows = {}
    for split in splits:
        split_dir = path / split
        if not any(split_dir.glob("*.parquet")):
            raise PreparedDataError(f"{split_dir}: no Parquet files for the {split!r} split")
        rows[split] = int(((manifest.get("splits") or {}).get(split) or {}).get("rows") or 0)
        if rows[split] <= 0:
            raise PreparedDataError(f"{manifest_file}: the {split!r} split has no rows")
    return Prepared(path, vocab_path, len(itos), manifest.get("max_len"), rows)


# --- batches on the workers ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchChunk:
    """The padded batches cut from one Ray batch. Not a tensor structure on purpose: Ray's
    iterator would try to concatenate a list of tensor tuples for the device copy, and the
    loop moves each batch to the device itself."""

    batches: tuple[loop.Batch, ...]


class PadCollate(ArrowBatchCollateFn):
    """Arrow batch {ids: list<int32>, label} -> BatchChunk of (ids [B, T], lengths, labels).

    Ray hands over chunks of `bucket * batch_size` rows; each chunk is sorted by length and cut
    into padded batches of `batch_size` (loop.bucket_batches), so little of each batch is
    padding. With `shuffle`, the batches of a chunk come out in random order.
    """

    def __init__(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: pa.Table) -> BatchChunk:
        ids = batch.column("ids").combine_chunks()
        if isinstance(ids, pa.ChunkedArray):  # an empty table combines to a ChunkedArray
            ids = pa.concat_arrays(ids.chunks) if ids.num_chunks else pa.array([], ids.type)
        labels = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        batches = loop.bucket_batches(
            ids.values.to_numpy(zero_copy_only=False),
            ids.offsets.to_numpy(),
            labels,
            self.batch_size,
            rng=self.rng if self.shuffle else None,
        )
        return BatchChunk(tuple(batches))


def _flatten(chunks: Iterable[BatchChunk]) -> Iterator[loop.Batch]:
    for chunk in chunks:
        yield from chunk.batches


def _shard_batches(
    shard: Any, batch_size: int, bucket: int, *, shuffle: bool, seed: int
) -> Iterator[loop.Batch]:
    chunk = batch_size * max(1, bucket)
    return _flatten(
        shard.iter_torch_batches(
            batch_size=chunk,
            collate_fn=PadCollate(batch_size, shuffle=shuffle, seed=seed),
            local_shuffle_buffer_size=4 * chunk if shuffle else None,
            local_shuffle_seed=seed if shuffle else None,
            prefetch_batches=2,
        )
    )


# --- the worker ---------------------------------------------------------------------------------


def _all_reduce_sums(values: list[float]) -> list[float]:
    """Sum over all workers (one all_reduce); identity with a single process."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _maybe_crash(hooks: Mapping[str, Any], epoch: int, rank: int, run_dir: Path) -> None:
    """Test hook: rank `crash_rank` dies (os._exit) at the start of epoch `crash_epoch`, once.

    A marker file under the run folder records the first attempt, so the replacement worker
    carries on. Before dying, wait until Ray Train has committed the previous checkpoint so
    that recovery has something to resume from.
    """
    if hooks.get("crash_epoch") != epoch or hooks.get("crash_rank", 1) != rank:
        return
    marker = run_dir / f".crashed-rank{rank}-epoch{epoch}"
    if marker.exists():
        return
    ray.train.get_all_reported_checkpoints()
    marker.touch()
    os._exit(1)


def _write_metrics_line(run_dir: Path, row: Mapping[str, Any], keep_through_epoch: int) -> None:
    """Append one epoch's row; drop rows past `keep_through_epoch` left by an interrupted run."""
    file = run_dir / METRICS_FILE
    kept = []
    if file.exists():
        for line in file.read_text().splitlines():
            if line.strip() and json.loads(line).get("epoch", 0) <= keep_through_epoch:
                kept.append(line)
    kept.append(json.dumps(dict(row)))
    tmp = file.with_suffix(".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    tmp.replace(file)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the model, resume from the latest checkpoint, run epochs.

    `config`: {"train": TrainConfig fields, "model": ModelConfig fields, "run_dir": str,
    "vocab_path": str, "max_len": int | None, "train_rows": int, "hooks": {...}}.
    """
    settings = TrainConfig(**config["train"])
    model_config = ModelConfig.from_dict(config["model"])
    run_dir = Path(config["run_dir"])
    hooks = config.get("hooks") or {}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = settings.threads_per_worker or max(
        1, (os.cpu_count() or 1) // max(1, context.get_local_world_size())
    )
    torch.set_num_threads(threads)
    loop.keep_freed_memory()
    loop.set_seed(settings.seed)  # the same initial weights everywhere (DDP broadcasts anyway)

    # NCCL cannot all-reduce a sparse gradient: sparse_embedding is for CPU workers only.
    model = LSTMClassifier(
        model_config, sparse_embedding=settings.sparse_embedding and not settings.use_gpu
    )
    state: dict[str, Any] = {"epoch": 0, "best_accuracy": -1.0, "best_epoch": 0, "done": False}
    resumed = ray.train.get_checkpoint()
    optimizer_state = scheduler_state = None
    if resumed is not None:
        with resumed.as_directory() as folder:
            weights = ckpt.load_weights(folder)
            if weights["embedding.weight"].shape[0] != model_config.vocab_size:
                raise ckpt.BundleError(
                    f"{folder}: checkpoint embedding has {weights['embedding.weight'].shape[0]}"
                    f" rows, vocab has {model_config.vocab_size}"
                )
            model.load_state_dict(weights)
            saved = ckpt.load_train_state(folder)
        optimizer_state, scheduler_state = saved.pop("optimizer"), saved.pop("scheduler")
        state.update(saved)
    started_from = int(state["epoch"])

    model = ray.train.torch.prepare_model(model)  # DDP across workers; moves to the device
    device = ray.train.torch.get_device()
    optimizer = loop.make_optimizer(model, settings.lr, settings.weight_decay)
    total_steps = settings.epochs * loop.steps_per_epoch(
        config["train_rows"], settings.batch_size, world
    )
    scheduler = loop.make_scheduler(
        optimizer, warmup_steps=int(settings.warmup * total_steps), total_steps=total_steps
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(started_from + 1, settings.epochs + 1):
        if state["done"]:
            break
        _maybe_crash(hooks, epoch, rank, run_dir)
        torch.manual_seed(settings.seed * 1000 + epoch)  # dropout: reproducible after resume
        start = time.perf_counter()
        train = loop.train_epoch(
            model,
            _shard_batches(
                train_shard,
                settings.batch_size,
                settings.bucket,
                shuffle=True,
                seed=settings.seed * 1000 + epoch * 100 + rank,
            ),
            optimizer,
            scheduler,
            clip=settings.clip,
            device=device,
        )
        val = loop.evaluate(
            model,
            _shard_batches(val_shard, settings.eval_batch_size, 4, shuffle=False, seed=0),
            device=device,
        )
        seconds = time.perf_counter() - start
        sums = _all_reduce_sums(
            [train.loss, train.correct, train.count, val.loss, val.correct, val.count]
        )
        metrics = {
            "epoch": epoch,
            "train_loss": sums[0] / max(1, sums[2]),
            "train_accuracy": sums[1] / max(1, sums[2]),
            "val_loss": sums[3] / max(1, sums[5]),
            SCORE: sums[4] / max(1, sums[5]),
            "val_rows": int(sums[5]),
            "train_rows": int(sums[2]),
            "samples_per_s": sums[2] / train.seconds if train.seconds > 0 else 0.0,
            "seconds": seconds,
            "lr": scheduler.get_last_lr()[0],
            "workers": world,
            "started_from_epoch": started_from,
        }
        if metrics[SCORE] > state["best_accuracy"]:
            state.update(best_accuracy=metrics[SCORE], best_epoch=epoch)
        state["epoch"] = epoch
        state["done"] = epoch - state["best_epoch"] >= settings.patience
        metrics["stopped_early"] = bool(state["done"] and epoch < settings.epochs)

        # Every rank reports; rank 0 alone uploads the checkpoint (the weights are identical).
        with _checkpoint_folder(rank == 0) as folder:
            if folder is not None:
                ckpt.write_bundle_files(
                    folder,
                    model,
                    model_config,
                    config["vocab_path"],
                    max_len=config["max_len"],
                    metrics=metrics,
                )
                ckpt.save_train_state(
                    folder,
                    {
                        **state,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
            )
        if rank == 0:
            _write_metrics_line(run_dir, metrics, keep_through_epoch=epoch - 1)
            print(_format_epoch(metrics, settings.epochs), flush=True)
        if hooks.get("fail_after_epoch") == epoch:
            raise RuntimeError(f"test hook: failing after epoch {epoch}")


class _checkpoint_folder:
    """A temp folder for rank 0's checkpoint (None elsewhere), removed after the report."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tmp: Any = None

    def __enter__(self) -> Path | None:
        if not self.enabled:
            return None
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="agnews-ckpt-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _format_epoch(m: Mapping[str, Any], epochs: int) -> str:
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc "
        f"{m['train_accuracy']:.4f}  |  val loss {m['val_loss']:.4f} acc {m[SCORE]:.4f}  |  "
        f"{m['samples_per_s']:.0f} samples/s  {m['seconds']:.1f} s"
        + ("  (early stop)" if m.get("stopped_early") else "")
    )


# --- the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any]  # of the best epoch (the one in model/)
    history: list[dict[str, Any]]  # metrics.jsonl, one row per epoch


def _check_resources(settings: TrainConfig) -> None:
    if settings.workers < 1:
        raise TrainError(f"workers must be >= 1, got {settings.workers}")
    if settings.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < settings.workers:
            raise TrainError(
                f"--gpu asks for {settings.workers} GPU worker(s), but the Ray cluster has "
                f"{gpus:g} GPU(s) (torch.cuda.is_available()={torch.cuda.is_available()}); "
                "use --no-gpu or a cluster with GPUs"
            )


def _resolve_model_config(model: Mapping[str, Any] | None, prepared: Prepared) -> ModelConfig:
    options = dict(model or {})
    if options.get("vocab_size") not in (None, prepared.vocab_size):
        raise PreparedDataError(
            f"model vocab_size={options['vocab_size']} does not match {prepared.vocab_path} "
            f"({prepared.vocab_size} tokens)"
        )
    options["vocab_size"] = prepared.vocab_size
    return ModelConfig.from_dict(options)


def _check_run_dir(run_dir: Path, run_info: dict[str, Any]) -> None:
    """Refuse to resume a RUN that was started with another model or prepared folder."""
    file = run_dir / RUN_FILE
    if not file.exists():
        return
    before = json.loads(file.read_text())
    for key in ("model", "prepared"):
        if before.get(key) != run_info[key]:
            raise TrainError(
                f"{file}: this run folder was started with {key}={before.get(key)!r}; "
                f"now {key}={run_info[key]!r}. Use a new --out folder, or the same settings "
                "to resume."
            )


def fit(
    prepared: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    model: Mapping[str, Any] | None = None,
    *,
    address: str | None = None,
    hooks: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train on PREP/train, validate on PREP/val, write RUN (see the module docstring).

    `config`: training settings (TrainConfig defaults when None). `model`: ModelConfig fields
    to override; vocab_size comes from the prepared vocab. `hooks`: test-only fault
    injection ({"crash_epoch": e, "crash_rank": r} or {"fail_after_epoch": e}).
    Connects to Ray (runtime.connect(address)) unless already connected. Running again on the same
    `out` resumes an interrupted run from its latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from agnews import runtime

    settings = config or TrainConfig()
    info = read_prepared(prepared)
    model_config = _resolve_model_config(model, info)
    run_dir = Path(out).expanduser().resolve()
    run_info = {
        "prepared": str(info.path),
        "model": model_config.to_dict(),
        "train": dataclasses.asdict(settings),
    }
    _check_run_dir(run_dir, run_info)
    runtime.connect(address)
    _check_resources(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")

    columns = ["ids", "label"]
    datasets = {
        split: ray.data.read_parquet(str(info.split_dir(split))).select_columns(columns)
        for split in ("train", "val")
    }
    datasets["train"] = datasets["train"].randomize_block_order(seed=settings.seed)
    resources = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(settings),
            "model": model_config.to_dict(),
            "run_dir": str(run_dir),
            "vocab_path": str(info.vocab_path),
            "max_len": info.max_len,
            "train_rows": info.rows["train"],
            "hooks": dict(hooks or {}),
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric=SCORE, mode="max") or result.checkpoint
    if best is None:
        raise TrainError(f"{run_dir}: training ended without a checkpoint")
    with best.as_directory() as folder:
        bundle = ckpt.load_bundle(folder)
    model_dir = ckpt.save_bundle(
        run_dir / MODEL_DIR,
        bundle.model,
        bundle.model_config,
        info.vocab_path,
        max_len=info.max_len,
        metrics=bundle.metrics,
        label_names=LABEL_NAMES,
    )
    history = [
        json.loads(line)
        for line in (run_dir / METRICS_FILE).read_text().splitlines()
        if line.strip()
    ]
    return TrainResult(run_dir, model_dir, dict(bundle.metrics), history)


# --- a DDP sanity check (tests; a new cluster) --------------------------------------------------


def ddp_gradient_probe(config: dict[str, Any]) -> dict[str, float]:
    """Worker: one DDP backward on a different batch per rank; return how gradients agree
    (rank 0's return value is `Result.return_value`).

    Returns `max_rank_difference` (largest gap between any rank's synced gradient and rank
    0's: 0 when DDP syncs), `max_mean_difference` (synced gradients vs the mean of every rank's
    local, unsynced gradient: 0 when DDP averages), `max_local_difference` (between the local
    gradients: > 0, the ranks did see different data) and `grad_norm`.
    """
    # No dropout of any kind: both backward passes below must see the same function.
    model_config = dataclasses.replace(
        ModelConfig.from_dict(config["model"]), dropout=0.0, word_dropout=0.0
    )
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(LSTMClassifier(model_config))
    rng = np.random.default_rng(rank + 1)
    rows = [
        rng.integers(2, model_config.vocab_size, rng.integers(2, 12)) for _ in range(config["rows"])
    ]
    ids, lengths, labels = loop.to_batch(*loop.pad_rows(rows), rng.integers(0, 4, len(rows)))

    def flat_grad(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in module.parameters()])

    inner = ckpt.unwrap(model)
    torch.nn.functional.cross_entropy(inner(ids, lengths), labels).backward()  # no DDP hooks
    local = flat_grad(inner).clone()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(ids, lengths), labels).backward()
    synced = flat_grad(model)
    locals_, synced_all = (
        [torch.zeros_like(local) for _ in range(world)],
        [torch.zeros_like(synced) for _ in range(world)],
    )
    torch.distributed.all_gather(locals_, local)
    torch.distributed.all_gather(synced_all, synced)
    synced_all, locals_all = torch.stack(synced_all), torch.stack(locals_)
    return {
        "workers": world,
        "max_rank_difference": float((synced_all - synced_all[0]).abs().max()),
        "max_mean_difference": float((synced_all - locals_all.mean(0)).abs().max()),
        "max_local_difference": float((locals_all - locals_all[0]).abs().max()),
        "grad_norm": float(synced.norm()),
    }
