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

# --- predict / classify (issue 4) -------------------------------------------------------------

# --- run (issue 5) ----------------------------------------------------------------------------


if __name__ == "__main__":
    main()
