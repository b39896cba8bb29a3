"""Training throughput: the project's epoch loop vs a naive loop, and Ray Train at 1 and 2 workers.

    python bench/bench_train.py [--prepared PREP] [--rows 4096]

Without --prepared it runs `agnews prepare` on /work/shared/data/ag_news (or --data) into a
temporary folder first. Every figure comes from the same run, on the first --rows rows of the
prepared train split, at the default model size (ModelConfig defaults):

- naive: one process, nn.LSTM (bidirectional) over batches of 64 consecutive rows padded to
  their longest row, no packing, no length bucketing, torch's default AdamW;
- loop: agnews.loop.train_epoch with LSTMClassifier, length-bucketed batches, fused AdamW
  (TrainConfig defaults); in process, no Ray;
- loop_sparse: the same with `--sparse-embedding` (sparse embedding gradient, loop.LazyAdamW);
- ray1 / ray2 / ray2_sparse: agnews.train.fit on a prepared folder holding those rows, 1 and
  2 workers (and 2 with --sparse-embedding), samples/s of the second epoch (the first warms
  up Ray Data).

Prints ONE JSON line of samples/s and ratios. naive, loop and loop_sparse alternate twice, each
in a fresh process (the project's loop sets allocator options process-wide, as train.py's
workers do); the best of each is kept (the machine is shared, so single timings are noisy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from agnews import loop
from agnews.config import PAD_ID, TrainConfig
from agnews.model import LSTMClassifier, ModelConfig


class NaiveLSTM(nn.Module):
    """The textbook model: nn.LSTM over the padded batch, max over all positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(
            config.embed_dim, config.hidden_dim, batch_first=True, bidirectional=True
        )
        self.head = nn.Linear(2 * config.hidden_dim, config.num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out.amax(dim=1))


def naive_samples_per_s(rows, labels, config: ModelConfig) -> float:
    torch.manual_seed(0)
    model = NaiveLSTM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, count = time.perf_counter(), 0
    for begin in range(0, len(rows), 64):
        batch = rows[begin : begin + 64]
        ids = torch.zeros(len(batch), max(len(r) for r in batch), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.as_tensor(row)
        target = torch.as_tensor(labels[begin : begin + 64])
        loss = nn.functional.cross_entropy(model(ids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += len(batch)
    return count / (time.perf_counter() - start)


def loop_samples_per_s(rows, labels, config: ModelConfig, settings: TrainConfig) -> float:
    torch.manual_seed(0)
    model = LSTMClassifier(config, sparse_embedding=settings.sparse_embedding)  # as train.py
    optimizer = loop.make_optimizer(model, settings.lr, settings.weight_decay)
    batches = loop.iterate_batches(
        rows, labels, settings.batch_size, shuffle=True, bucket=settings.bucket
    )
    return loop.train_epoch(model, batches, optimizer, clip=settings.clip).samples_per_s


def vocab_size_of(prepared: Path) -> int:
    return json.loads((prepared / "manifest.json").read_text())["vocab_size"]


def load_rows(prepared: Path, rows: int) -> tuple[list[np.ndarray], np.ndarray]:
    table = pq.read_table(prepared / "train").slice(0, rows)
    ids = table.column("ids").combine_chunks()
    offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
    arrays = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    labels = table.column("label").to_numpy().astype(np.int64)
    return arrays, labels


def measure(kind: str, prepared: Path, rows: int, threads: int) -> float:
    """samples/s of one in-process loop, run in a fresh process (see main)."""
    torch.set_num_threads(threads)
    arrays, labels = load_rows(prepared, rows)
    config = ModelConfig(vocab_size=vocab_size_of(prepared))
    if kind == "naive":
        return naive_samples_per_s(arrays, labels, config)
    loop.keep_freed_memory()  # as train.py's workers do
    settings = TrainConfig(sparse_embedding=kind == "loop_sparse")
    return loop_samples_per_s(arrays, labels, config, settings)


def subset_prepared(prepared: Path, out: Path, rows: int) -> Path:
    """A prepared folder with the first `rows` train rows and a small val split."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    out.mkdir(parents=True)
    shutil.copy(prepared / "vocab.json", out / "vocab.json")
    for split, n in (("train", rows), ("val", max(256, rows // 16))):
        table = pq.read_table(prepared / split).slice(0, n)
        (out / split).mkdir()
        pq.write_table(table, out / split / "part-0.parquet")
        manifest["splits"][split] = {"rows": table.num_rows}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=None)
    parser.add_argument("--data", default="/work/shared/data/ag_news")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from agnews import runtime

    runtime.connect()
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        prepared = args.prepared
        if prepared is None:
            from agnews.prepare import prepare_ag_news

            prepared = scratch / "prepared"
            prepare_ag_news(args.data, str(prepared))
        # Each measurement in a fresh process: the project's loop sets process-wide allocator
        # options (loop.keep_freed_memory) that the naive loop must not inherit.
        spawn = multiprocessing.get_context("spawn")
        figures_of: dict[str, list[float]] = {"naive": [], "loop": [], "loop_sparse": []}
        for _ in range(2):
            for kind, figures in figures_of.items():
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    figures.append(
                        pool.submit(measure, kind, Path(prepared), args.rows, args.threads).result()
                    )
        naive, project, project_sparse = (figures_of[k] for k in ("naive", "loop", "loop_sparse"))
        config = ModelConfig(vocab_size=vocab_size_of(Path(prepared)))
        settings = TrainConfig()
        sparse = dataclasses.replace(settings, sparse_embedding=True)

        from agnews.train import fit

        subset = subset_prepared(Path(prepared), scratch / "subset", args.rows)
        ray_figures = {}
        for name, workers, base in (
            ("ray1", 1, settings),
            ("ray2", 2, settings),
            ("ray2_sparse", 2, sparse),
        ):
            result = fit(
                subset,
                scratch / name,
                dataclasses.replace(base, epochs=2, workers=workers, patience=99),
            )
            ray_figures[name] = result.history[-1]["samples_per_s"]
        figures = {
            "bench": "train",
            "rows": args.rows,
            "threads": args.threads,
            "model": dataclasses.asdict(config),
            "batch_size": {"naive": 64, "project": settings.batch_size},
            "naive_samples_per_s": round(max(naive), 1),
            "loop_samples_per_s": round(max(project), 1),
            "loop_sparse_samples_per_s": round(max(project_sparse), 1),
            **{f"{k}_samples_per_s": round(v, 1) for k, v in ray_figures.items()},
            "loop_vs_naive": round(max(project) / max(naive), 2),
            "loop_sparse_vs_naive": round(max(project_sparse) / max(naive), 2),
            **{f"{k}_vs_naive": round(v / max(naive), 2) for k, v in ray_figures.items()},
            "all_naive": [round(x, 1) for x in naive],
            "all_loop": [round(x, 1) for x in project],
            "all_loop_sparse": [round(x, 1) for x in project_sparse],
        }
        print(json.dumps(figures), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
