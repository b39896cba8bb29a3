"""runtime.connect: the local Ray it starts sets up every worker with runtime.quiet_worker."""

from __future__ import annotations

import os
import subprocess
import sys

_LEVEL_IN_A_WORKER = """
import logging
import ray
from agnews import runtime

runtime.connect()

@ray.remote(num_cpus=0.1)
def cleaner_log_level():
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    return logging.getLogger(name).getEffectiveLevel()

print("level", ray.get(cleaner_log_level.remote()))
"""


def test_local_ray_workers_silence_the_placement_group_cleaner():
    # In a fresh process: the session's Ray is already initialised in this one.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _LEVEL_IN_A_WORKER],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    level = int(done.stdout.split("level")[-1])
    assert level == 40  # logging.ERROR: its once-a-second warnings without a dashboard are gone
