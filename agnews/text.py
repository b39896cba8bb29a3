"""Tokenizer and vocabulary, exactly torchtext 0.18's, vectorised on pyarrow. No Ray in here.

torchtext's `get_tokenizer("basic_english")` is a pure-Python function: lowercase, twelve regex
substitutions in order, then `str.split()`. `basic_english` below is that function, kept as the
specification. `tokenize` computes the same tokens for a whole Arrow column at once:

- lowercase with `utf8_lower`, except rows holding a character whose lowercase differs between
  Python and utf8proc (U+0130, the final-sigma rule of U+03A3, and letters newer than the Python's
  Unicode database); those few rows are lowercased by Python, so the result stays exact;
- drop `"` first (dropping it can create a `<br />`), then one regex pass replacing `<br />`,
  `;`, `:` and Python's non-ASCII whitespace by a space, then plain substring passes spacing out
  `'`, `.`, `,`, `(`, `)`, `!`, `?`. The fusion is exact because no replacement produces text
  that a later pattern of torchtext's order would match, other than whitespace, which the
  final split swallows;
- trim and split on ASCII whitespace, which after the pass above is exactly Python's
  `str.isspace` set (checked by a test over every code point).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from agnews.config import PAD_TOKEN, TOKENIZER_NAME, UNK_ID, UNK_TOKEN
from agnews.outputs import write_json_atomic

# torchtext/data/utils.py, 0.18: the patterns and replacements of _basic_english_normalize.
_TORCHTEXT_PATTERNS = [
    r"\'",
    r"\"",
    r"\.",
    r"<br \/>",
    r",",
    r"\(",
    r"\)",
    r"\!",
    r"\?",
    r"\;",
    r"\:",
    r"\s+",
]
_TORCHTEXT_REPLACEMENTS = [" '  ", "", " . ", " ", " , ", " ( ", " ) ", " ! ", " ? ", " ", " ", " "]
_TORCHTEXT_RULES = [
    (re.compile(p), r) for p, r in zip(_TORCHTEXT_PATTERNS, _TORCHTEXT_REPLACEMENTS, strict=True)
]


def basic_english(line: str) -> list[str]:
    """torchtext 0.18 `get_tokenizer("basic_english")`, line for line: the reference."""
    line = line.lower()
    for pattern, replacement in _TORCHTEXT_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


@functools.cache
def _python_only_lowercase_class() -> str:
    """A regex class of the characters that utf8_lower and Python's str.lower treat differently.

    Computed once per process against the running Python and pyarrow, so it stays right when
    either one's Unicode tables move.
    """
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    arrow_lower = pc.utf8_lower(pa.array(chars)).to_pylist()
    differing = {c for c, low in zip(chars, arrow_lower, strict=True) if c.lower() != low}
    differing.add("\u03a3")  # Σ: Python applies the context-dependent final-sigma rule
    return "[" + "".join(sorted(re.escape(c) for c in differing)) + "]"


@functools.cache
def _non_ascii_whitespace_class() -> str:
    """A regex class of what Python's str.split() splits on beyond ASCII whitespace."""
    spaces = (chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    return "[" + "".join(c for c in spaces if c.isspace() and c not in " \t\n\v\f\r") + "]"


def _lower(texts: pa.Array) -> pa.Array:
    is_ascii = pc.string_is_ascii(texts)
    if pc.all(is_ascii).as_py() is not False:
        return pc.ascii_lower(texts)
    lowered = pc.utf8_lower(texts)
    needs_python = pc.and_kleene(
        pc.invert(is_ascii), pc.match_substring_regex(texts, _python_only_lowercase_class())
    )
    needs_python = pc.fill_null(needs_python, False)
    if not pc.any(needs_python).as_py():
        return lowered
    rows = np.flatnonzero(needs_python.to_numpy(zero_copy_only=False))
    replacements = pa.array([texts[int(i)].as_py().lower() for i in rows], pa.string())
    return pc.replace_with_mask(lowered, needs_python, replacements)


def _drop_empty_tokens(lists: pa.ListArray) -> pa.ListArray:
    flat = pc.list_flatten(lists)
    keep = pc.greater(pc.binary_length(flat), 0)
    if pc.all(keep).as_py() is not False:
        return lists
    parents = pc.list_parent_indices(lists).to_numpy()
    kept_parents = parents[keep.to_numpy(zero_copy_only=False)]
    lengths = np.bincount(kept_parents, minlength=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets), pc.filter(flat, keep), mask=pc.is_null(lists)
    )


def tokenize(texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Tokens of each text, equal to `basic_english` row for row; null stays null."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())
    text = _lower(texts)
    text = pc.replace_substring(text, '"', "")
    # Python's non-ASCII whitespace becomes a space here, so the ASCII split below is exact.
    text = pc.replace_substring_regex(text, f"<br />|[;:]|{_non_ascii_whitespace_class()}", " ")
    for mark in "',.()!?":  # plain substring passes beat one regex with a capture group
        text = pc.replace_substring(text, mark, f" {mark} ")
    # Trimmed first, ascii_split_whitespace yields no empty token but for an empty text ([""]).
    text = pc.ascii_trim_whitespace(text)
    lists = pc.ascii_split_whitespace(text)
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    if pc.any(pc.equal(pc.binary_length(text), 0)).as_py():
        lists = _drop_empty_tokens(lists)
    return lists


def count_tokens(token_lists: pa.ListArray) -> pa.Table:
    """Token counts of a batch as a table {token: string, count: int64}, in no set order."""
    counts = pc.value_counts(pc.list_flatten(token_lists))
    return pa.table(
        {"token": counts.field("values"), "count": counts.field("counts").cast(pa.int64())}
    )


def sum_counts(tables: Iterable[pa.Table]) -> pa.Table:
    """Sums partial count tables into one {token, count}."""
    empty = pa.table({"token": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    merged = pa.concat_tables([empty, *(t.select(["token", "count"]) for t in tables)])
    if merged.num_rows == 0:
        return empty
    summed = merged.group_by("token").aggregate([("count", "sum")])
    return summed.rename_columns(["token", "count"]).select(["token", "count"])


@dataclass(frozen=True)
class Vocab:
    """Token <-> id, in torchtext's `build_vocab_from_iterator` order with specials first."""

    itos: tuple[str, ...]
    counts: tuple[int, ...]  # per id; 0 for the specials
    min_freq: int = 1
    max_size: int | None = None

    @classmethod
    def from_counts(
        cls, counts: pa.Table, *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Builds the vocab from a {token, count} table, as torchtext would from the same tokens.

        torchtext sorts by count descending then token ascending, cuts to `max_size - 2` BEFORE
        removing specials and applying `min_freq`; that order is kept, quirks included.
        """
        specials = (PAD_TOKEN, UNK_TOKEN)
        if max_size is not None and max_size < len(specials):
            raise ValueError(f"max_size must be at least {len(specials)}, got {max_size}")
        if min_freq < 1:
            raise ValueError(f"min_freq must be at least 1, got {min_freq}")
        # Arrow sorts strings by UTF-8 bytes, which is Python's code point order.
        order = pc.sort_indices(counts, sort_keys=[("count", "descending"), ("token", "ascending")])
        ranked = counts.take(order)
        if max_size is not None:
            ranked = ranked.slice(0, max_size - len(specials))
        keep = pc.and_(
            pc.invert(pc.is_in(ranked["token"], value_set=pa.array(specials))),
            pc.greater_equal(ranked["count"], min_freq),
        )
        ranked = ranked.filter(keep)
        return cls(
            itos=specials + tuple(ranked["token"].to_pylist()),
            counts=(0,) * len(specials) + tuple(ranked["count"].to_pylist()),
            min_freq=min_freq,
            max_size=max_size,
        )

    def __len__(self) -> int:
        return len(self.itos)

    @cached_property
    def _itos_array(self) -> pa.Array:
        return pa.array(self.itos, pa.string())

    @cached_property
    def stoi(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.itos)}

    def encode(self, token_lists: pa.ListArray, max_len: int | None = None) -> pa.ListArray:
        """Ids (list<int32>) of each token list, unknown tokens as <unk>, cut to `max_len`."""
        if isinstance(token_lists, pa.ChunkedArray):
            token_lists = token_lists.combine_chunks()
        if max_len is not None:
            token_lists = pc.list_slice(token_lists, 0, max_len)
            if isinstance(token_lists, pa.ChunkedArray):
                token_lists = token_lists.combine_chunks()
        flat = pc.list_flatten(token_lists)
        ids = pc.fill_null(pc.index_in(flat, value_set=self._itos_array), UNK_ID).cast(pa.int32())
        lengths = pc.fill_null(pc.list_value_length(token_lists), 0).to_numpy()
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), ids, mask=pc.is_null(token_lists)).cast(
            pa.list_(pa.int32())
        )

    def encode_texts(self, texts: pa.Array | pa.ChunkedArray, max_len: int | None = None):
        """tokenize + encode."""
        return self.encode(tokenize(texts), max_len)

    def to_json(self) -> dict:
        return {
            "tokenizer": TOKENIZER_NAME,
            "itos": list(self.itos),
            "counts": list(self.counts),
            "min_freq": self.min_freq,
            "max_size": self.max_size,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes vocab.json atomically."""
        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no vocabulary file here") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a vocabulary file (invalid JSON: {e})") from None
        itos = data.get("itos") if isinstance(data, dict) else None
        if not isinstance(itos, list) or itos[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(
                f'{path}: not a vocabulary file (needs "itos" starting with <pad>, <unk>)'
            )
        counts = data.get("counts") or [0] * len(itos)
        if len(counts) != len(itos):
            raise ValueError(f"{path}: {len(itos)} tokens but {len(counts)} counts")
        if len(set(itos)) != len(itos):
            raise ValueError(f"{path}: duplicate tokens in itos")
        return cls(tuple(itos), tuple(counts), data.get("min_freq", 1), data.get("max_size"))
