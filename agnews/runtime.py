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
    ray.init(
        address=address,
        include_dashboard=False if address is None and "RAY_ADDRESS" not in os.environ else None,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
    quiet_data()


def quiet_data() -> None:
    """Ray Data's progress bars are noise in logs and tests; our stages print their own lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
