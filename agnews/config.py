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


@dataclass(frozen=True)
class PrepareConfig:
    val_fraction: float = 0.05
    min_freq: int = 1
    max_size: int | None = None
    max_len: int | None = 256
    seed: int = 0
    max_rejected_fraction: float = 0.01
