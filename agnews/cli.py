"""The `agnews` command: a thin click face over the pipeline stages."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agnews")
def main() -> None:
    """Train an LSTM news-topic classifier on AG_NEWS and classify news archives, on Ray."""


# --- prepare / download (issue 2) -------------------------------------------------------------


def _fail(error: Exception) -> None:
    """Known failures end with one clear message, not a traceback."""
    raise click.ClickException(str(error)) from error


@main.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Cache folder (default ~/.cache/agnews, or $AGNEWS_CACHE).",
)
def download(root: str | None) -> None:
    """Fetch AG_NEWS (torchtext's source, MD5-checked) into the cache."""
    from agnews.data import DEFAULT_CACHE, DataError, download_ag_news

    try:
        folder = download_ag_news(root or DEFAULT_CACHE)
    except DataError as e:
        _fail(e)
    click.echo(f"AG_NEWS is in {folder}")


@main.command()
@click.option(
    "--data",
    "data_dir",
    default=None,
    help="Folder with train.csv and test.csv (official AG_NEWS format). Default: download.",
)
@click.option("--out", required=True, help="Output folder for the prepared Parquet.")
@click.option("--val-fraction", default=0.05, show_default=True, type=float)
@click.option("--min-freq", default=1, show_default=True, type=int)
@click.option("--max-size", default=None, type=int, help="Vocab size cap, specials included.")
@click.option("--max-len", default=256, show_default=True, type=int, help="Tokens kept per row.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the val split.")
@click.option("--max-rejected-fraction", default=0.01, show_default=True, type=float)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
def prepare(
    data_dir, out, val_fraction, min_freq, max_size, max_len, seed, max_rejected_fraction,
    overwrite, address,
) -> None:  # fmt: skip
    """Tokenize AG_NEWS, build the vocabulary and write prepared Parquet, on Ray Data."""
    from agnews.config import PrepareConfig
    from agnews.data import DEFAULT_CACHE, DataError, download_ag_news
    from agnews.prepare import PrepareError, prepare_ag_news
    from agnews.runtime import connect

    config = PrepareConfig(
        val_fraction=val_fraction,
        min_freq=min_freq,
        max_size=max_size,
        max_len=max_len,
        seed=seed,
        max_rejected_fraction=max_rejected_fraction,
    )
    try:
        data_dir = data_dir or str(download_ag_news(DEFAULT_CACHE))
        connect(address)
        prepare_ag_news(data_dir, out, config, overwrite=overwrite, log=click.echo)
    except (DataError, PrepareError, ValueError) as e:
        _fail(e)


# --- train (issue 3) --------------------------------------------------------------------------


def _train_defaults():
    from agnews.config import TrainConfig
    from agnews.model import ModelConfig

    return TrainConfig(), ModelConfig(vocab_size=1)


@main.command()
@click.option("--prepared", required=True, help="Folder written by `agnews prepare`.")
@click.option("--out", required=True, help="Run folder; running again on it resumes the run.")
@click.option("--workers", default=_train_defaults()[0].workers, show_default=True, type=int)
@click.option("--gpu/--no-gpu", "use_gpu", default=False, show_default=True)
@click.option("--epochs", default=_train_defaults()[0].epochs, show_default=True, type=int)
@click.option("--batch-size", default=_train_defaults()[0].batch_size, show_default=True, type=int)
@click.option("--lr", default=_train_defaults()[0].lr, show_default=True, type=float)
@click.option("--embed-dim", default=_train_defaults()[1].embed_dim, show_default=True, type=int)
@click.option("--hidden-dim", default=_train_defaults()[1].hidden_dim, show_default=True, type=int)
@click.option("--layers", default=_train_defaults()[1].layers, show_default=True, type=int)
@click.option(
    "--bidirectional/--no-bidirectional",
    default=_train_defaults()[1].bidirectional,
    show_default=True,
)
@click.option("--dropout", default=_train_defaults()[1].dropout, show_default=True, type=float)
@click.option(
    "--word-dropout",
    default=_train_defaults()[1].word_dropout,
    show_default=True,
    type=float,
    help="Training only: chance that a token is replaced by <unk>.",
)
@click.option(
    "--pooling",
    type=click.Choice(["last", "max", "mean", "maxmean"]),
    default=_train_defaults()[1].pooling,
    show_default=True,
)
@click.option(
    "--sparse-embedding/--dense-embedding",
    default=_train_defaults()[0].sparse_embedding,
    show_default=True,
    help="CPU: sparse embedding gradient, lazy AdamW; less DDP traffic, but fits slower.",
)
@click.option("--seed", default=_train_defaults()[0].seed, show_default=True, type=int)
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
def train(
    prepared, out, workers, use_gpu, epochs, batch_size, lr, embed_dim, hidden_dim, layers,
    bidirectional, dropout, word_dropout, pooling, sparse_embedding, seed, address,
) -> None:  # fmt: skip
    """Train the LSTM classifier on Ray Train; the best model goes to OUT/model/."""
    import dataclasses

    from agnews.checkpoint import BundleError
    from agnews.train import TrainError, fit

    settings = dataclasses.replace(
        _train_defaults()[0],
        workers=workers,
        use_gpu=use_gpu,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        sparse_embedding=sparse_embedding,
        seed=seed,
    )
    model = dict(
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        layers=layers,
        bidirectional=bidirectional,
        dropout=dropout,
        word_dropout=word_dropout,
        pooling=pooling,
    )
    try:
        result = fit(prepared, out, settings, model, address=address)
    except (TrainError, BundleError, ValueError) as e:
        _fail(e)
    best = result.metrics
    click.echo(
        f"best epoch {best.get('epoch')}: val accuracy {best.get('val_accuracy', 0):.4f}; "
        f"model in {result.model_dir}"
    )


# --- predict / classify (issue 4) -------------------------------------------------------------


def _mapping_from_flags(text_col, title_col, description_col, label_col, label_format, id_col):
    """A ColumnMapping from the flags, or None for the reader's defaults (AG_NEWS, or `text`)."""
    from agnews.data import ColumnMapping

    flags = (text_col, title_col, description_col, label_col, id_col)
    if all(f is None for f in flags) and label_format == "auto":
        return None
    if text_col is None and title_col is None and description_col is None:
        text_col = "text"
    return ColumnMapping(
        text=text_col,
        title=title_col,
        description=description_col,
        label=label_col,
        label_format=label_format,
        id=id_col,
    )


@main.command()
@click.option("--model", required=True, help="A training run folder (uses its model/) or a bundle.")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    help="File, folder or glob; local or a URI (s3://, gs://, ...). Repeat for more.",
)
@click.option("--out", required=True, help="Output folder (predictions/, rejected/, report).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "ag_news", "csv", "tsv", "jsonl", "parquet"]),
    default="auto",
    show_default=True,
)
@click.option("--text-col", default=None, help="Column holding the text (default: text).")
@click.option("--title-col", default=None, help="Title column; text = title + ' ' + description.")
@click.option("--description-col", default=None, help="Description column.")
@click.option("--label-col", default=None, help="Column holding the true class (optional).")
@click.option(
    "--label-format",
    type=click.Choice(["auto", "index0", "index1", "name"]),
    default="auto",
    show_default=True,
    help="auto: 1-4 or class names; index0: 0-3; index1: 1-4; name: World, Sports, ...",
)
@click.option("--id-col", default=None, help="Column holding row ids (default: file:row).")
@click.option("--keep-columns", default="", help="Source columns copied to predictions: a,b.")
@click.option(
    "--long-text",
    type=click.Choice(["truncate", "chunk"]),
    default="truncate",
    show_default=True,
    help="truncate: the model's max_len tokens; chunk: mean over max_len windows.",
)
@click.option("--batch-size", default=4096, show_default=True, type=int, help="Rows per call.")
@click.option("--workers", default=None, type=int, help="Inference actors (default: auto).")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Default: GPU when Ray has one.")
@click.option("--int8", is_flag=True, help="CPU: dynamic int8 quantized LSTM and head.")
@click.option("--max-rejected-fraction", default=0.01, show_default=True, type=float)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
def predict(
    model, inputs, out, fmt, text_col, title_col, description_col, label_col, label_format,
    id_col, keep_columns, long_text, batch_size, workers, use_gpu, int8, max_rejected_fraction,
    overwrite, address,
) -> None:  # fmt: skip
    """Classify news archives in bulk on Ray Data: predictions, rejected rows and a report."""
    from agnews.checkpoint import BundleError
    from agnews.data import DataError
    from agnews.infer import PredictError
    from agnews.infer import predict as run_predict
    from agnews.runtime import connect

    try:
        mapping = _mapping_from_flags(
            text_col, title_col, description_col, label_col, label_format, id_col
        )
        connect(address)
        run_predict(
            list(inputs),
            model,
            out,
            fmt=fmt,
            mapping=mapping,
            batch_size=batch_size,
            workers=workers,
            use_gpu=use_gpu,
            long_text=long_text,
            keep_columns=[c.strip() for c in keep_columns.split(",") if c.strip()],
            overwrite=overwrite,
            int8=int8,
            max_rejected_fraction=max_rejected_fraction,
            log=click.echo,
        )
    except (BundleError, DataError, PredictError, ValueError) as e:
        _fail(e)


@main.command()
@click.argument("text", required=False)
@click.option("--model", required=True, help="A training run folder (uses its model/) or a bundle.")
@click.option("--long-text", type=click.Choice(["truncate", "chunk"]), default="truncate")
@click.option("--int8", is_flag=True, help="Dynamic int8 quantized LSTM and head.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per text.")
def classify(text, model, long_text, int8, as_json) -> None:
    """Classify TEXT, or stdin one text a line (no TEXT, or -), in this process without Ray."""
    import json
    import sys

    from agnews.checkpoint import BundleError
    from agnews.infer import classify_texts, inference_model

    try:
        ready = inference_model(model, int8=int8)
    except (BundleError, ValueError) as e:
        _fail(e)
    if text is None or text == "-":
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        texts = [t for t in texts if t.strip()]
    else:
        texts = [text]
    for result in classify_texts(ready, texts, long_text):
        if as_json:
            click.echo(json.dumps(result.__dict__, ensure_ascii=False))
        elif result.pred_name is None:
            click.echo(f"-\t{result.reason}\t{result.text}")
        else:
            probs = "  ".join(f"{name} {p:.3f}" for name, p in result.probs.items())
            shown = f"\t{result.text}" if len(texts) > 1 else ""
            click.echo(f"{result.pred_name}\t{result.confidence:.3f}\t{probs}{shown}")


# --- run (issue 5) ----------------------------------------------------------------------------


@main.command("run")
@click.option("--out", required=True, help="Output root: prepared/, run/, predict/, summary.json.")
@click.option("--split-seed", default=0, show_default=True, type=int, help="Seed of the val split.")
@click.option("--predict-batch-size", default=4096, show_default=True, type=int)
@click.option("--predict-workers", default=None, type=int, help="Inference actors (default: auto).")
@click.option("--overwrite", is_flag=True, help="Prepare again even if OUT/prepared is complete.")
def run_command(data_dir, out, split_seed, predict_batch_size, predict_workers, overwrite, **opts):
    """The whole job: prepare -> train -> predict the test set -> report, into OUT.

    Running it again on the same OUT goes on where it stopped (training resumes).
    """
    import dataclasses

    from agnews.checkpoint import BundleError
    from agnews.config import PrepareConfig
    from agnews.data import DataError
    from agnews.infer import PredictError
    from agnews.pipeline import run
    from agnews.prepare import PrepareError
    from agnews.train import TrainError

    prepare_config = PrepareConfig(
        val_fraction=opts.pop("val_fraction"),
        min_freq=opts.pop("min_freq"),
        max_size=opts.pop("max_size"),
        max_len=opts.pop("max_len"),
        seed=split_seed,
        max_rejected_fraction=opts["max_rejected_fraction"],
    )
    model = {k: opts.pop(k) for k in _MODEL_OPTIONS}
    predict_options = {
        "batch_size": predict_batch_size,
        "workers": predict_workers,
        "int8": opts.pop("int8"),
        "use_gpu": opts["use_gpu"],
        "max_rejected_fraction": opts.pop("max_rejected_fraction"),
    }
    address = opts.pop("address")
    train_config = dataclasses.replace(_train_defaults()[0], **opts)
    try:
        run(
            data_dir,
            out,
            prepare_config=prepare_config,
            train_config=train_config,
            model=model,
            predict_options=predict_options,
            address=address,
            overwrite=overwrite,
            log=click.echo,
        )
    except (DataError, PrepareError, TrainError, BundleError, PredictError, ValueError) as e:
        _fail(e)


_MODEL_OPTIONS = (
    "embed_dim",
    "hidden_dim",
    "layers",
    "bidirectional",
    "dropout",
    "word_dropout",
    "pooling",
)
# `run` takes the stage commands' own options, so each flag has one definition and one default.
run_command.params[:0] = [p for p in prepare.params if p.name == "data_dir"]
run_command.params += [
    p
    for command, names in (
        (prepare, ("val_fraction", "min_freq", "max_size", "max_len", "max_rejected_fraction")),
        (
            train,
            ("workers", "use_gpu", "epochs", "batch_size", "lr", "sparse_embedding", "seed")
            + _MODEL_OPTIONS,
        ),
        (predict, ("int8",)),
        (prepare, ("address",)),
    )
    for p in command.params
    if p.name in names
]


if __name__ == "__main__":
    main()
