"""Connecting to Ray: a running cluster when an address is given or found, else a local one."""

from __future__ import annotations

import logging
import os


def connect(address: str | None = None, *, quiet: bool = True) -> None:
    """Joins Ray once per process.

    With `address` (or RAY_ADDRESS, as under `ray job submit`) it joins that cluster; otherwise
    `ray.init()` starts a local Ray sized to this machine. Inside a job Ray is already
    initialised, or a bare `ray.init()` joins it: passing num_cpus there is refused.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    local = address is None and "RAY_ADDRESS" not in os.environ
    ray.init(
        address=address,
        include_dashboard=False if local else None,
        logging_level=logging.WARNING if quiet else logging.INFO,
        runtime_env={"worker_process_setup_hook": "agnews.runtime.quiet_worker"} if local else None,
    )
    quiet_data()


def quiet_worker() -> None:
    """Set-up of each Ray worker process of a local Ray started by `connect` (no dashboard).

    Ray Train's PlacementGroupCleaner asks the State API, which the dashboard serves, whether
    the train controller is alive, once a second; without a dashboard it logs a warning each
    time, ~500 lines per training run. Its job, removing the placement group of a controller
    that died, does not arise on a local Ray, which ends with the driver.
    """
    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logging.getLogger(cleaner).setLevel(logging.ERROR)


def quiet_data() -> None:
    """Ray Data's progress bars are noise in logs and tests; our stages print their own lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
