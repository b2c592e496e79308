"""The environment every S3 test shares: dummy credentials for the loopback S3 server, no way out of 127.0.0.1.

Call :func:`use_loopback_s3_env` at module import (collection time): Ray workers inherit the environment
of the process that starts Ray, later. IMDS lookups are off, and the environment's endpoint is a closed
loopback port, so an S3 call that misses the ``--storage-options`` endpoint fails on 127.0.0.1 instead of
going anywhere else.
"""

from __future__ import annotations

import os

ACCESS_KEY = "AKIAENRICHTEST000001"
SECRET_KEY = "enrich-test-secret-7f3c9d2a1b"


def use_loopback_s3_env() -> None:
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
