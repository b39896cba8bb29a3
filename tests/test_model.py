"""Model, epoch loop and bundle: plain PyTorch, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agnews import loop
from agnews.checkpoint import BundleError, load_bundle, save_bundle
from agnews.model import LSTMClassifier, ModelConfig

VOCAB = 40


def synthetic_rows(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows whose tokens mostly come from a class-specific id range (ids 2..39)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    rows = []
    for label in labels:
        length = int(rng.integers(3, 15))
        topic = rng.integers(2 + 8 * label, 10 + 8 * label, length)
        noise = rng.integers(34, VOCAB, length)
        rows.append(np.where(rng.random(length) < 0.6, topic, noise).astype(np.int32))
    return rows, labels.astype(np.int64)


def small_config(**overrides) -> ModelConfig:
    options = dict(
        vocab_size=VOCAB, embed_dim=12, hidden_dim=10, layers=1, dropout=0.0, word_dropout=0.0
    )
    options.update(overrides)
    return ModelConfig(**options)


def padded(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = loop.pad_rows(rows)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


# --- model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "max", "mean", "maxmean"])
@pytest.mark.parametrize("bidirectional,layers", [(True, 2), (False, 1)])
def test_packed_and_padded_paths_agree_and_ignore_padding(pooling, bidirectional, layers):
    torch.manual_seed(0)
    config = small_config(pooling=pooling, bidirectional=bidirectional, layers=layers)
    model = LSTMClassifier(config).eval()
    rows, _ = synthetic_rows(6, seed=1)
    ids, lengths = padded(rows)
    with torch.no_grad():
        model.packing = True
        packed = model(ids, lengths)
        model.packing = False
        fused = model(ids, lengths)
        alone = torch.cat([model(*padded([row])) for row in rows])  # no padding at all
    assert packed.shape == (6, 4)
    torch.testing.assert_close(packed, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_bidirectional_matches_torch_packed_bilstm():
    """Our per-direction LSTMs compute what nn.LSTM(bidirectional=True) computes on packed data."""
    torch.manual_seed(0)
    model = LSTMClassifier(small_config(pooling="last")).eval()
    reference = torch.nn.LSTM(12, 10, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{name}_l0").copy_(getattr(model.rnns[0], f"{name}_l0"))
            getattr(reference, f"{name}_l0_reverse").copy_(getattr(model.rnns[1], f"{name}_l0"))
        ids, lengths = padded(synthetic_rows(5, seed=2)[0])
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            model.embedding(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = reference(packed)
        want = model.head(torch.cat([h_n[0], h_n[1]], dim=1))
        torch.testing.assert_close(model(ids, lengths), want, rtol=1e-5, atol=1e-5)


def test_model_config_validates_and_round_trips():
    config = small_config(pooling="max")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="pooling"):
        small_config(pooling="attention")
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "heads": 2})
    with pytest.raises(ValueError, match="word_dropout"):
        small_config(word_dropout=1.0)
    # A bundle saved before word_dropout existed loads with the default.
    old = {k: v for k, v in config.to_dict().items() if k != "word_dropout"}
    assert ModelConfig.from_dict(old).word_dropout == ModelConfig(vocab_size=2).word_dropout


def test_word_dropout_trains_the_unk_row_and_leaves_padding_and_eval_alone():
    torch.manual_seed(0)
    model = LSTMClassifier(small_config(word_dropout=0.25))
    seen = []
    model.embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    rows = [np.full(n, 7, dtype=np.int32) for n in np.random.default_rng(0).integers(5, 40, 300)]
    ids, lengths = padded(rows)
    real = torch.arange(ids.size(1))[None, :] < lengths[:, None]

    model(ids, lengths).sum().backward()
    fed = seen[-1]
    assert (fed[~real] == 0).all()  # padding stays padding
    assert set(fed[real].unique().tolist()) == {1, 7}  # real tokens: kept or <unk>
    assert (fed[real] == 1).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert model.embedding.weight.grad[1].abs().sum() > 0  # the <unk> row learns

    model.eval()
    with torch.no_grad():
        model(ids, lengths)
    assert torch.equal(seen[-1], ids)  # eval never drops


# --- batches ------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(2, 1000), min_size=1, max_size=12), min_size=1, max_size=40),
    st.integers(1, 9),
)
def test_bucket_batches_keep_every_row_once_and_pad_with_zero(rows, batch_size):
    arrays = [np.array(r, dtype=np.int32) for r in rows]
    labels = np.arange(len(rows)) % 4
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    batches = loop.bucket_batches(
        np.concatenate(arrays), offsets, labels, batch_size, rng=np.random.default_rng(0)
    )
    seen = []
    for ids, lengths, batch_labels in batches:
        assert ids.dtype == lengths.dtype == batch_labels.dtype == torch.int64
        assert len(lengths) <= batch_size and ids.shape[1] == int(lengths.max())
        for row, length, label in zip(ids.numpy(), lengths.numpy(), batch_labels.numpy()):
            assert (row[length:] == 0).all()
            seen.append((tuple(row[:length]), int(label)))
    want = [(tuple(r), int(label)) for r, label in zip(rows, labels)]
    assert sorted(seen) == sorted(want)


def test_pad_flat_handles_sliced_offsets():
    values = np.arange(10, 20)
    ids, lengths = loop.pad_flat(values, np.array([3, 5, 6, 9]))
    assert lengths.tolist() == [2, 1, 3]
    assert ids.tolist() == [[13, 14, 0], [15, 0, 0], [16, 17, 18]]


def test_lr_warms_up_then_decays():
    factors = [loop.lr_factor(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.1


# --- the loop learns ----------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_embedding", [True, False])
def test_epoch_loop_learns_synthetic_topics(sparse_embedding):
    torch.manual_seed(0)
    loop.set_seed(0)
    rows, labels = synthetic_rows(800, seed=0)
    val_rows, val_labels = synthetic_rows(200, seed=1)
    model = LSTMClassifier(
        small_config(dropout=0.1, word_dropout=0.1), sparse_embedding=sparse_embedding
    )
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.01)
    epochs, batch_size = 4, 32
    total = epochs * loop.steps_per_epoch(len(rows), batch_size)
    scheduler = loop.make_scheduler(optimizer, warmup_steps=5, total_steps=total)
    before = loop.evaluate(model, loop.iterate_batches(val_rows, val_labels, 64))
    for epoch in range(epochs):
        batches = loop.iterate_batches(rows, labels, batch_size, shuffle=True, seed=epoch, bucket=4)
        train = loop.train_epoch(model, batches, optimizer, scheduler, clip=1.0)
        assert train.count == len(rows)
    after = loop.evaluate(model, loop.iterate_batches(val_rows, val_labels, 64))
    assert after.count == 200
    assert after.accuracy > 0.9
    assert after.mean_loss < before.mean_loss


class _EmbeddingAndHead(torch.nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(10, 4, sparse=sparse)  # not decayed, by its name
        self.head = torch.nn.Linear(12, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).flatten(1))


def test_lazy_adamw_is_adamw_for_rows_seen_and_leaves_other_rows_alone():
    lazy_model, dense_model = _EmbeddingAndHead(True), _EmbeddingAndHead(False)
    lazy = loop.make_optimizer(lazy_model, lr=0.05, weight_decay=0.1)
    dense = loop.make_optimizer(dense_model, lr=0.05, weight_decay=0.1)
    assert isinstance(lazy, loop.LazyAdamW) and isinstance(dense, torch.optim.AdamW)
    batch = torch.tensor([[1, 2, 3], [3, 2, 1], [2, 2, 1]])  # rows 1-3 in every step
    for step in range(5):
        for model, optimizer in ((lazy_model, lazy), (dense_model, dense)):
            optimizer.zero_grad()
            model(batch).pow(2).sum().mul(step + 1).backward()
            optimizer.step()
    assert lazy_model.embedding.weight.grad.is_sparse
    for got, want in zip(lazy_model.parameters(), dense_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    before = lazy_model.embedding.weight.detach().clone()
    lazy.zero_grad()
    lazy_model(torch.tensor([[4, 4, 5]])).sum().backward()
    lazy.step()  # dense AdamW's momentum would move rows 1-3 too; lazy moves 4 and 5 only
    moved = (lazy_model.embedding.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [4, 5]

    # The state survives a checkpoint round trip.
    restored = loop.make_optimizer(_EmbeddingAndHead(True), lr=0.05, weight_decay=0.1)
    restored.load_state_dict(lazy.state_dict())
    assert float(restored.state_dict()["state"][0]["step"]) == 6


def test_clip_gradients_equals_torch_clipping_with_sparse_gradients_too():
    sparse_model, dense_model = _EmbeddingAndHead(True), _EmbeddingAndHead(False)
    batch = torch.tensor([[1, 2, 2], [7, 1, 1]])  # repeated rows: uncoalesced sparse gradient
    for model in (sparse_model, dense_model):
        model(batch).pow(2).sum().mul(100).backward()
    want = torch.nn.utils.clip_grad_norm_(dense_model.parameters(), 1.0)
    got = loop.clip_gradients(sparse_model.parameters(), 1.0)
    torch.testing.assert_close(got, want)
    assert want > 1.0  # it did clip
    for s_param, d_param in zip(sparse_model.parameters(), dense_model.parameters()):
        grad = s_param.grad.to_dense() if s_param.grad.is_sparse else s_param.grad
        torch.testing.assert_close(grad, d_param.grad)
    assert float(loop.clip_gradients(dense_model.parameters(), 100.0)) == pytest.approx(1.0)


_MMAPPED_BYTES_AFTER_A_BIG_TENSOR = """
import ctypes, sys
import torch
from agnews import loop

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert loop.keep_freed_memory()
before = libc.mallinfo2().hblkhd
big = torch.zeros(64 * 2**20 // 4)  # 64 MB, over glibc's largest mmap threshold
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_serves_big_tensors_from_the_heap():
    def mmapped(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _MMAPPED_BYTES_AFTER_A_BIG_TENSOR, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.split()[-1])

    assert mmapped("default") >= 64 * 2**20  # glibc's default: its own mmap, unmapped on free
    assert mmapped("keep") == 0  # from the heap, reused after free


# --- bundle -------------------------------------------------------------------------------------


def make_bundle(tmp_path, **config_overrides):
    torch.manual_seed(0)
    config = small_config(**config_overrides)
    model = LSTMClassifier(config)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"itos": ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]}))
    path = save_bundle(
        tmp_path / "bundle", model, config, vocab, max_len=64, metrics={"val_accuracy": 0.5}
    )
    return path, model, config


def test_bundle_round_trip_gives_same_predictions(tmp_path):
    path, model, config = make_bundle(tmp_path, pooling="max", dropout=0.3)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "vocab.json", "weights.pt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Tensors only: loadable with weights_only=True.
    assert isinstance(torch.load(path / "weights.pt", weights_only=True), dict)
    bundle = load_bundle(path)
    assert bundle.model_config == config and not bundle.model.training
    assert bundle.itos[:2] == ("<pad>", "<unk>") and len(bundle.itos) == VOCAB
    assert bundle.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert bundle.max_len == 64 and bundle.metrics == {"val_accuracy": 0.5}
    assert bundle.tokenizer == "basic_english"
    ids, lengths = padded(synthetic_rows(8)[0])
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(ids, lengths), model.eval()(ids, lengths))


def test_save_bundle_replaces_an_existing_bundle(tmp_path):
    path, _, _ = make_bundle(tmp_path)
    config = small_config(hidden_dim=6)
    save_bundle(path, LSTMClassifier(config), config, {"itos": ["x"] * VOCAB}, max_len=None)
    assert load_bundle(path).model_config.hidden_dim == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "vocab.json"]


def test_load_bundle_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="config.json"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(BundleError, match="config.json.*not an agnews model"):
        load_bundle(tmp_path)


def test_load_bundle_refuses_files_that_disagree(tmp_path):
    path, _, _ = make_bundle(tmp_path)
    vocab = json.loads((path / "vocab.json").read_text())
    (path / "vocab.json").write_text(json.dumps({"itos": vocab["itos"][:-1]}))
    with pytest.raises(BundleError, match="vocab.json.*39 tokens.*vocab_size=40"):
        load_bundle(path)

    path, _, _ = make_bundle(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["hidden_dim"] = 11
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="weights.pt.*does not match"):
        load_bundle(path)

    with pytest.raises(BundleError, match="vocab has 3 tokens"):
        save_bundle(
            tmp_path / "b2", LSTMClassifier(small_config()), small_config(), ["a"] * 3, max_len=None
        )
    assert not (tmp_path / "b2").exists()
