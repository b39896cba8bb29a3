"""The epoch loop in plain PyTorch: a test, or a GPU box without Ray, can run it alone.

A batch is `(ids, lengths, labels)`: ids LongTensor [B, T] padded with PAD_ID to the batch's
longest row, lengths LongTensor [B] (>= 1), labels LongTensor [B]. The loop knows nothing of
the model beyond `model(ids, lengths) -> logits`; Ray Train (train.py) wraps it.

Reading order: pad_rows / bucket_batches -> set_seed -> make_optimizer / make_scheduler ->
train_epoch -> evaluate.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agnews.config import PAD_ID

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# --- batches ------------------------------------------------------------------------------------


def pad_flat(
    values: np.ndarray, offsets: np.ndarray, *, pad_id: int = PAD_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Pad rows given as one flat array + offsets (Arrow's list layout) to the longest row.

    Returns (ids int64 [B, T_max], lengths int64 [B]). Vectorised: one scatter, no row loop.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    rows = len(lengths)
    width = int(lengths.max()) if rows else 0
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    if rows:
        row_of = np.repeat(np.arange(rows), lengths)
        col_of = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
        ids[row_of, col_of] = values[offsets[0] : offsets[-1]]
    return ids, lengths


def pad_rows(rows: Sequence[np.ndarray], *, pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Pad a list of 1-D int arrays to the longest row: (ids int64 [B, T_max], lengths [B])."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(rows) if len(rows) else np.zeros(0, dtype=np.int64)
    return pad_flat(values, offsets, pad_id=pad_id)


def to_batch(ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> Batch:
    return (
        torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def bucket_batches(
    values: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
) -> list[Batch]:
    """Cut one chunk of rows (flat values + offsets) into padded batches of similar lengths.

    Rows are sorted by length and cut into `batch_size` slices, so a batch pads to little more
    than its own rows; the batch order is then shuffled (with `rng`) so that training does not
    see lengths in order. With a chunk of many batches, the shuffle across the dataset comes
    from whoever made the chunk (a shuffled permutation, a Ray Data shuffle).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        row_offsets = np.concatenate([[0], np.cumsum(lengths[pick])])
        # Gather the picked rows' values into one flat array, vectorised.
        take = np.repeat(offsets[:-1][pick] - row_offsets[:-1], lengths[pick]) + np.arange(
            row_offsets[-1]
        )
        ids, row_lengths = pad_flat(values[take], row_offsets)
        batches.append(to_batch(ids, row_lengths, np.asarray(labels)[pick]))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(
    rows: Sequence[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    bucket: int = 1,
) -> Iterable[Batch]:
    """Batches over in-memory rows (tests, benchmarks, a Ray-less run).

    `bucket` > 1 takes chunks of `bucket * batch_size` rows and cuts each by length
    (`bucket_batches`); 1 pads every batch of consecutive rows as it comes.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    labels = np.asarray(labels)
    chunk = batch_size * max(1, bucket)
    for start in range(0, len(order), chunk):
        pick = order[start : start + chunk]
        picked = [rows[i] for i in pick]
        if bucket > 1:
            lengths = np.fromiter((len(r) for r in picked), dtype=np.int64, count=len(picked))
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            yield from bucket_batches(
                np.concatenate(picked),
                offsets,
                labels[pick],
                batch_size,
                rng=rng if shuffle else None,
            )
        else:
            ids, lengths = pad_rows(picked)
            yield to_batch(ids, lengths, labels[pick])


# --- set-up -------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and the embedding table are not decayed (decay would shrink rare words)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    try:
        # The fused kernel is ~8x faster than the default on CPU for a large embedding table.
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_factor: float = 0.05) -> float:
    """Linear warm-up to 1, then cosine decay to `min_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps),
    )


# --- one epoch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sums:
    """Sums over batches, so that workers can all_reduce them before dividing."""

    loss: float  # summed per-sample loss
    correct: int
    count: int
    seconds: float

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)

    @property
    def samples_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def _autocast(device: torch.device):
    # bf16 autocast on GPU only: on CPU it is slower for LSTMs and changes numerics.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    clip: float | None = 1.0,
    device: torch.device | str = "cpu",
) -> Sums:
    """One pass over `batches`: forward, cross-entropy, backward, clip, step."""
    device = torch.device(device)
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for ids, lengths, labels in batches:
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(ids, lengths)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.numel()
        loss_sum += loss.item() * n
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += n
    return Sums(loss_sum, correct, count, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], *, device: torch.device | str = "cpu"
) -> Sums:
    """Summed loss, correct predictions and row count over `batches` (eval mode)."""
    device = torch.device(device)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for ids, lengths, labels in batches:
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(ids, lengths).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += labels.numel()
    return Sums(loss_sum, correct, count, time.perf_counter() - start)


def steps_per_epoch(rows: int, batch_size: int, workers: int = 1) -> int:
    """Optimizer steps per epoch on each worker (shards are split equally)."""
    return max(1, math.ceil((rows // max(1, workers)) / batch_size))
