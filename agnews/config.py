"""Frozen dataclasses for each stage: one source of defaults for the CLI and the jobs."""

from __future__ import annotations

from dataclasses import dataclass

# AG_NEWS files hold labels 1..4; inside the project they are 0..3 in this order.
LABEL_NAMES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
NUM_CLASSES = len(LABEL_NAMES)

# Vocabulary specials, in id order (torchtext's build_vocab_from_iterator with specials first).
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKENIZER_NAME = "basic_english"
# The `kind` of a prepared folder's manifest.json: written by prepare, checked by train.
PREPARED_KIND = "agnews-prepared"


@dataclass(frozen=True)
class PrepareConfig:
    val_fraction: float = 0.05
    min_freq: int = 1
    max_size: int | None = None
    max_len: int | None = 256
    seed: int = 0
    max_rejected_fraction: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the model's own are `agnews.model.ModelConfig`)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of all optimizer steps spent warming up, then cosine decay
    clip: float = 1.0  # gradient-norm clipping; 0 = off
    bucket: int = 16  # batches per length-sorted chunk (less padding); 1 = plain batches
    eval_batch_size: int = 512
    workers: int = 1
    use_gpu: bool = False
    # CPU only: a sparse embedding gradient with lazy AdamW (loop.LazyAdamW). DDP all-reduces
    # only the rows used (1.2x the samples/s of 2 workers here), but it fit slower: -0.4 to
    # -0.6 val points in two runs.
    sparse_embedding: bool = False
    cpus_per_worker: float = 0.5  # fractional: whole CPUs per worker starve Ray Data's reads
    threads_per_worker: int = 0  # torch threads; 0 = this node's CPUs / workers on it
    seed: int = 0
    patience: int = 3  # epochs without a better val accuracy before stopping
    max_failures: int = 2  # worker failures recovered from the last checkpoint
