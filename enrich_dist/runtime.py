"""The only module that starts or attaches Ray, and reads what the cluster offers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Storage settings passed to Ray workers through the runtime_env when this process starts or attaches to a Ray.
# Only settings, never secrets: a runtime_env is stored by the cluster and shown on its dashboard. S3 credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) reach a local Ray's workers because they inherit
# this process's environment, and a cluster's workers from each node's own environment (a Kubernetes Secret, an
# instance role): see docs/operations.md. ENRICH_PSEUDONYM_KEY is only ever read by the driver.
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)
# set by Ray in the driver of a job sent with `ray job submit`; the job's own runtime_env then applies
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class Resources:
    """CPUs and GPUs the attached Ray cluster has in total."""

    cpus: int
    gpus: int


def worker_env() -> dict[str, str]:
    """The runtime_env ``env_vars`` for a Ray this process starts or attaches to (empty inside a submitted job).

    Inside a job the job's runtime_env already holds these settings, and Ray refuses a driver runtime_env that
    sets the same variables again.
    """
    if _JOB_CONFIG_ENV in os.environ:
        return {}
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Resources]:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; shut down only what we started.

    Reuses an already-initialised Ray (tests share one session-wide instance).
    """
    import ray

    from .errors import InfrastructureError

    if ray.is_initialized():
        yield cluster_resources()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = worker_env()
    kwargs: dict = {
        "runtime_env": {"env_vars": env} if env else None,
        "log_to_driver": True,
        "configure_logging": False,
    }
    try:
        if address:
            log.info("attaching to Ray at %s", address)
            ray.init(address=address, **kwargs)
        else:
            log.info("starting a local Ray (num_cpus=%s)", num_cpus or "all")
            # a local Ray reports no usage statistics unless the user asks for it (RAY_USAGE_STATS_ENABLED=1)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # "local": always a new instance, never one a `ray start` or another program left running here
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the run cannot start: exit 4
        where = f"attach to the Ray cluster at {address}" if address else "start a local Ray"
        fix = ("check that the cluster is up and the address (or RAY_ADDRESS) is right" if address else
               "check free memory and /tmp space, or attach to a running cluster with --ray-address")
        raise InfrastructureError(f"could not {where} ({type(exc).__name__}: {exc}): {fix}") from exc
    try:
        yield cluster_resources()
    finally:
        ray.shutdown()


def quiet_ray_data() -> None:
    """No progress bars or start-of-execution messages from Ray Data (called where Ray Data is used: it
    costs about a second to import, which commands without it do not pay)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_resources() -> Resources:
    """Total CPUs and GPUs of the attached cluster (GPU count 0 when there are none)."""
    import ray

    res = ray.cluster_resources()
    return Resources(cpus=int(res.get("CPU", 0)), gpus=int(res.get("GPU", 0)))


def as_completed(refs: list, label: str, logger: logging.Logger | None = None, every: float = 0.1) -> Iterator:
    """Yield (index, result) of Ray object refs as they finish, logging progress every ``every`` share."""
    import time

    import ray

    logger = logger or log
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    total, done, next_log, start = len(refs), 0, every, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            yield index[ref], ray.get(ref)
            done += 1
        if total and (done / total >= next_log or not pending):
            rate = done / max(time.monotonic() - start, 1e-9)
            logger.info("%s: %d/%d done (%.0f%%, %.1f/s)", label, done, total, 100 * done / total, rate)
            next_log = (int(done / total / every) + 1) * every
