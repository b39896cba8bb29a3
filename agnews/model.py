"""LSTMClassifier: embedding -> (bi)LSTM over packed sequences -> pooling -> linear head.

Plain PyTorch, nothing of Ray. The hyper-parameters live in `ModelConfig`, which is saved
next to the weights (checkpoint.py), so a model can be rebuilt from JSON alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from agnews.config import NUM_CLASSES, PAD_ID, UNK_ID

POOLINGS = ("last", "max", "mean", "maxmean")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of `LSTMClassifier`; `vocab_size` comes from the prepared vocab."""

    vocab_size: int
    embed_dim: int = 128
    hidden_dim: int = 128
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.3
    # Training only: each real token becomes <unk> with this probability. The vocab comes from
    # the train split, so train rows hold no <unk> at all; without this, the <unk> row that
    # every unseen word of val, test and production text maps to stays at its random init.
    word_dropout: float = 0.1
    pooling: str = "maxmean"  # last | max | mean | maxmean (max and mean concatenated)
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("vocab_size", "embed_dim", "hidden_dim", "layers", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("dropout", "word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def features(self) -> int:
        """Width of the pooled vector that feeds the head."""
        width = self.hidden_dim * (2 if self.bidirectional else 1)
        return width * (2 if self.pooling == "maxmean" else 1)


class LSTMClassifier(nn.Module):
    """Classify padded token-id sequences.

    forward(ids [B, T] LongTensor padded with PAD_ID, lengths [B] LongTensor of real lengths
    >= 1) -> logits [B, num_classes]. Pooling looks at real tokens only.

    Each layer and direction is a one-layer unidirectional `nn.LSTM`; the backward direction
    reads every row reversed within its own length, so both directions see only real tokens
    first. Two ways to run them give the same numbers (up to float rounding):

    - packed (`pack_padded_sequence`, enforce_sorted=False): no work on padding; the fast path
      on CUDA (cuDNN).
    - padded: the fused oneDNN kernel over the padded batch. On CPU it is ~2.5x faster than
      the packed path, which runs an unfused per-step loop, even though it computes the
      padding; outputs past a row's length are masked away, never read.

    `packing=None` (default) picks packed on CUDA and padded elsewhere. `sparse_embedding=True`
    gives the embedding table a sparse gradient, for training on CPU (loop.make_optimizer).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        packing: bool | None = None,
        sparse_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.packing = packing
        self.directions = 2 if config.bidirectional else 1
        # sparse_embedding: the table's gradient holds only the batch's rows (training on CPU;
        # see loop.LazyAdamW). Not for NCCL, which cannot all-reduce sparse tensors.
        self.embedding = nn.Embedding(
            config.vocab_size, config.embed_dim, padding_idx=PAD_ID, sparse=bool(sparse_embedding)
        )
        width = config.hidden_dim * self.directions
        self.rnns = nn.ModuleList(
            nn.LSTM(config.embed_dim if layer == 0 else width, config.hidden_dim, batch_first=True)
            for layer in range(config.layers)
            for _ in range(self.directions)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, config.num_classes)

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Last-layer LSTM outputs [B, T, hidden * directions]; junk past each row's length.

        The forward direction's half is in reading order. The backward direction's half stays
        in its own order, where position t holds token len-1-t: pooling never needs it turned
        back (max and mean do not care about order, and both directions end at len-1), so
        only a layer that feeds another one is reversed back.
        """
        packing = self.packing if self.packing is not None else ids.is_cuda
        lengths = lengths.to(ids.device)
        steps = torch.arange(ids.size(1), device=ids.device)[None, :]
        # Position t of a reversed row holds position len-1-t; padding stays where it is.
        reverse_index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
        if self.training and self.config.word_dropout > 0:
            unseen = torch.rand(ids.shape, device=ids.device) < self.config.word_dropout
            ids = ids.masked_fill(unseen & (ids != PAD_ID), UNK_ID)
        x = self._dropout(self.embedding(ids))
        # The backward direction reads each row reversed within its length. (Reversing the ids
        # and looking them up twice would be cheaper, but the two directions would then get
        # different dropout masks, which measured worse on val.)
        inputs = (x, _reverse_rows(x, reverse_index))[: self.directions]
        outputs: list[torch.Tensor] = []
        for layer in range(self.config.layers):
            if layer > 0:
                # The next layer reads both directions at the same positions: turn the backward
                # one back into reading order, then feed the result in both orders again.
                turned = [_reverse_rows(out, reverse_index) for out in outputs[1:]]
                x = self._dropout(torch.cat([outputs[0], *turned], dim=2))
                inputs = (x, _reverse_rows(x, reverse_index))[: self.directions]
            outputs = []
            for direction, inp in enumerate(inputs):
                rnn = self.rnns[layer * self.directions + direction]
                if packing:
                    packed = pack_padded_sequence(
                        inp, lengths.cpu(), batch_first=True, enforce_sorted=False
                    )
                    out, _ = pad_packed_sequence(
                        rnn(packed)[0], batch_first=True, total_length=inp.size(1)
                    )
                else:
                    out, _ = rnn(inp)
                outputs.append(out)
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(ids.device)
        states = self.encode(ids, lengths)
        pooling = self.config.pooling
        if pooling == "last":
            # Both directions end at len-1 in their own order (encode).
            rows = torch.arange(ids.size(0), device=ids.device)
            pooled = states[rows, lengths - 1]
        else:
            steps = torch.arange(states.size(1), device=ids.device)[None, :]
            real = (steps < lengths[:, None]).unsqueeze(-1)
            parts = []
            if pooling in ("max", "maxmean"):
                parts.append(states.masked_fill(~real, float("-inf")).amax(dim=1))
            if pooling in ("mean", "maxmean"):
                total = states.masked_fill(~real, 0.0).sum(dim=1)
                parts.append(total / lengths.to(states.dtype)[:, None])
            pooled = torch.cat(parts, dim=1)
        return self.head(self._dropout(pooled))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.dropout
        if not self.training or p == 0 or x.is_cuda:
            return self.dropout(x)
        # On CPU, nn.Dropout's bernoulli_ costs about twice a uniform draw and a compare.
        keep = torch.rand(x.shape, device=x.device, dtype=x.dtype) >= p
        return x * keep * (1.0 / (1.0 - p))


def _reverse_rows(x: torch.Tensor, reverse_index: torch.Tensor) -> torch.Tensor:
    """Reverse each row of x [B, T, D] within its own length (an involution)."""
    return x.gather(1, reverse_index[:, :, None].expand(-1, -1, x.size(2)))
