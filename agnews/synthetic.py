"""Small synthetic AG_NEWS-format data: for tests, dry runs and demos without the real files.

Each class draws most words from its own topic list and some from a shared list, so a model can
learn it quickly but not trivially. Written in the official format: no header, quoted
"label","title","description", labels 1-4.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

TOPIC_WORDS = {
    1: "minister election embassy troops treaty summit parliament rebels refugees ceasefire",
    2: "match goal season coach playoff striker tournament inning quarterback medal",
    3: "shares profit quarterly earnings merger stocks investors revenue bank inflation",
    4: "software internet processor chip browser wireless nasa genome linux spacecraft",
}
SHARED_WORDS = "the a of in to and on for with said new year today report week after"


def make_ag_news(
    folder: str | os.PathLike, train_rows: int = 400, test_rows: int = 100, seed: int = 0
) -> Path:
    """Writes `folder/train.csv` and `folder/test.csv`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shared = SHARED_WORDS.split()
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
            for _ in range(rows):
                label = int(rng.integers(1, 5))
                topic = TOPIC_WORDS[label].split()
                n = int(rng.integers(6, 20))
                words = [
                    topic[rng.integers(len(topic))]
                    if rng.random() < 0.6
                    else shared[rng.integers(len(shared))]
                    for _ in range(n)
                ]
                title = " ".join(words[:4]).capitalize()
                description = " ".join(words[4:]) + "."
                writer.writerow([label, title, description])
    return folder
