"""Shared fixtures: one real local Ray for the whole session, temporary run dirs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# keep the local Ray on loopback (otherwise it binds the machine's outward address)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs) shared by every test that needs one."""
    import ray

    from enrich_dist.runtime import quiet_ray_data

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture
def run_dir(tmp_path):
    from enrich_dist.storage import RunDir

    return RunDir(str(tmp_path / "run"))
