"""`ray job submit --working-dir . -- python jobs/predict.py --model RUN --input PATH --out DIR`.

Bulk classification of news archives, with the options of `agnews predict`: one prediction
per article in DIR/predictions/, unreadable rows in DIR/rejected/, and a report where the
archive has labels.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agnews.cli import predict  # noqa: E402

if __name__ == "__main__":
    predict(prog_name="jobs/predict.py")
