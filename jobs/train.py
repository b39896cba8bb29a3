"""`ray job submit --working-dir . -- python jobs/train.py --data DIR --out DIR [options]`.

The whole pipeline (prepare -> train -> predict the test set -> report), with the options of
`agnews run`. Inside a Ray job it joins the job's cluster with a bare `ray.init()`; run alone
(`python jobs/train.py ...`) it starts a local Ray, like `agnews run`.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is importable from the working dir even
# where it is not installed on the cluster's nodes.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agnews.cli import run_command  # noqa: E402

if __name__ == "__main__":
    run_command(prog_name="jobs/train.py")
