import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# ray.init() turns on token auth by default while `ray start` may not: say it once, for all.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole test session: 2 cores do not afford more."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
