"""One model bundle = a folder of tensors + JSON, no pickled code.

Layout of a bundle folder:

- `weights.pt`: the model's state_dict (tensors only), written with `torch.save` and read with
  `torch.load(..., weights_only=True)`.
- `vocab.json`: the prepared vocabulary, `{"itos": [token, ...], ...}` (`<pad>` = 0, `<unk>` = 1),
  copied as is from the prepared folder.
- `config.json`: `{"kind": "agnews-model", "format": 1, "model": ModelConfig fields,
  "label_names": [...], "tokenizer": "basic_english", "max_len": int | null, "pad_id": 0,
  "unk_id": 1, "metrics": {...}}`.

Public API (inference relies on it; keep it stable):

- `save_bundle(path, model, model_config, vocab, *, max_len, metrics) -> Path`
- `load_bundle(path, *, device="cpu") -> Bundle`; a frozen dataclass with `model` (in eval mode),
  `model_config`, `itos`, `label_names`, `max_len`, `metrics`, `tokenizer`, `path`, and
  `vocab_path` (to rebuild a full Vocab with the text module).
- `BundleError` (a ValueError) names the offending file when a folder is not a bundle or its
  files disagree.

A training checkpoint is a bundle plus `train_state.pt` (optimizer, scheduler, epoch; also
tensors and plain numbers only), see `save_train_state` / `load_train_state`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agnews.config import LABEL_NAMES, PAD_ID, TOKENIZER_NAME, UNK_ID
from agnews.model import LSTMClassifier, ModelConfig
from agnews.outputs import publish, temp_folder_beside

WEIGHTS_FILE = "weights.pt"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
BUNDLE_KIND = "agnews-model"
BUNDLE_FORMAT = 1


class BundleError(ValueError):
    """A folder is not a model bundle, or its files disagree with each other."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: a ready model (eval mode) and what it needs to read text."""

    model: LSTMClassifier
    model_config: ModelConfig
    itos: tuple[str, ...]
    label_names: tuple[str, ...]
    max_len: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = TOKENIZER_NAME
    path: Path | None = None

    @property
    def vocab_path(self) -> Path | None:
        return None if self.path is None else self.path / VOCAB_FILE


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return model.module if hasattr(model, "module") else model


def _vocab_json(vocab: str | os.PathLike | Mapping | Sequence[str] | Any) -> bytes:
    """vocab.json bytes from a path (copied as is), a {"itos": ...} dict, a token list, or an
    object with an `itos` attribute (a Vocab)."""
    if isinstance(vocab, (str, os.PathLike)):
        data = Path(vocab).read_bytes()
        _parse_itos(data, Path(vocab))
        return data
    if isinstance(vocab, Mapping):
        payload = dict(vocab)
    elif hasattr(vocab, "itos"):
        payload = {"itos": list(vocab.itos)}
    else:
        payload = {"itos": list(vocab)}
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _parse_itos(data: bytes, where: Path) -> list[str]:
    try:
        itos = json.loads(data)["itos"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{where}: not a vocab file (want a JSON object with 'itos')") from e
    if not isinstance(itos, list) or len(itos) <= UNK_ID:
        raise BundleError(f"{where}: 'itos' must be a list with at least <pad> and <unk>")
    return itos


def _write_atomically(path: Path, write: Any) -> Path:
    """Call write(tmp_dir) on a fresh temp folder next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_bundle_files(
    folder: Path,
    model: nn.Module,
    model_config: ModelConfig,
    vocab: Any,
    *,
    max_len: int | None,
    metrics: Mapping[str, Any] | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> None:
    """Write the three bundle files into an existing folder (not atomic; see save_bundle)."""
    vocab_bytes = _vocab_json(vocab)
    itos = _parse_itos(vocab_bytes, Path(folder) / VOCAB_FILE)
    if len(itos) != model_config.vocab_size:
        raise BundleError(
            f"vocab has {len(itos)} tokens but the model config says vocab_size="
            f"{model_config.vocab_size}"
        )
    if len(label_names) != model_config.num_classes:
        raise BundleError(
            f"{len(label_names)} label names for a model with {model_config.num_classes} classes"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / VOCAB_FILE).write_bytes(vocab_bytes)
    config = {
        "kind": BUNDLE_KIND,
        "format": BUNDLE_FORMAT,
        "model": model_config.to_dict(),
        "label_names": list(label_names),
        "tokenizer": TOKENIZER_NAME,
        "max_len": max_len,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "metrics": dict(metrics or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_bundle(
    path: str | os.PathLike,
    model: nn.Module,
    model_config: ModelConfig,
    vocab_path_or_obj: Any,
    *,
    max_len: int | None,
    metrics: Mapping[str, Any] | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> Path:
    """Write a bundle to `path` atomically (temp folder next to it, then rename); return path.

    `vocab_path_or_obj`: a vocab.json path (copied as is), a {"itos": [...]} dict, a token
    list, or an object with `.itos`. A DDP-wrapped model is unwrapped.
    """
    return _write_atomically(
        Path(path),
        lambda tmp: write_bundle_files(
            tmp,
            model,
            model_config,
            vocab_path_or_obj,
            max_len=max_len,
            metrics=metrics,
            label_names=label_names,
        ),
    )


def read_bundle_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a bundle folder, checked to be one."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise BundleError(f"{config_file}: missing; {path} is not an agnews model bundle")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise BundleError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{config_file}: not an agnews model config (kind != {BUNDLE_KIND!r})")
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{config_file}: unsupported bundle format {config.get('format')!r}")
    return config


def load_bundle(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle written by save_bundle; the model is on `device`, in eval mode.

    Raises BundleError, naming the file, when the folder is not a bundle or when its files
    disagree (vocab size vs config vs embedding rows, label names vs classes, weights vs
    architecture).
    """
    path = Path(path)
    config = read_bundle_config(path)
    config_file = path / CONFIG_FILE
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{config_file}: bad 'model' section ({e})") from e
    label_names = tuple(config.get("label_names") or ())
    if len(label_names) != model_config.num_classes:
        raise BundleError(
            f"{config_file}: {len(label_names)} label names for {model_config.num_classes} classes"
        )
    vocab_file = path / VOCAB_FILE
    if not vocab_file.is_file():
        raise BundleError(f"{vocab_file}: missing")
    itos = _parse_itos(vocab_file.read_bytes(), vocab_file)
    if len(itos) != model_config.vocab_size:
        raise BundleError(
            f"{vocab_file}: {len(itos)} tokens, but {config_file} says vocab_size="
            f"{model_config.vocab_size}"
        )
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise BundleError(f"{weights_file}: missing")
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or unsafe file
        raise BundleError(f"{weights_file}: cannot be read as tensors only ({e})") from e
    embedding = state.get("embedding.weight") if isinstance(state, dict) else None
    if embedding is None or embedding.shape[0] != len(itos):
        rows = None if embedding is None else embedding.shape[0]
        raise BundleError(
            f"{weights_file}: embedding has {rows} rows but {vocab_file} has {len(itos)} tokens"
        )
    model = LSTMClassifier(model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{weights_file}: does not match the model in {config_file}: {e}") from e
    model.to(device).eval()
    return Bundle(
        model=model,
        model_config=model_config,
        itos=tuple(itos),
        label_names=label_names,
        max_len=config.get("max_len"),
        metrics=dict(config.get("metrics") or {}),
        tokenizer=config.get("tokenizer", TOKENIZER_NAME),
        path=path,
    )


# --- training state (optimizer etc.) next to a bundle, for resuming ---------------------------


def save_train_state(folder: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Optimizer/scheduler state dicts and plain numbers; loadable with weights_only=True."""
    torch.save(dict(state), Path(folder) / TRAIN_STATE_FILE)


def load_train_state(folder: str | os.PathLike) -> dict[str, Any]:
    file = Path(folder) / TRAIN_STATE_FILE
    if not file.is_file():
        raise BundleError(f"{file}: missing; not a training checkpoint")
    return torch.load(file, map_location="cpu", weights_only=True)


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state_dict of a bundle folder (tensors only)."""
    return torch.load(Path(folder) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
