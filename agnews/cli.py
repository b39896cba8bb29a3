"""The `agnews` command: a thin click face over the pipeline stages."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agnews")
def main() -> None:
    """Train an LSTM news-topic classifier on AG_NEWS and classify news archives, on Ray."""


# --- prepare / download (issue 2) -------------------------------------------------------------

# --- train (issue 3) --------------------------------------------------------------------------

# --- predict / classify (issue 4) -------------------------------------------------------------

# --- run (issue 5) ----------------------------------------------------------------------------


if __name__ == "__main__":
    main()
