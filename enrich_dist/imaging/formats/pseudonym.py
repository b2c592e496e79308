"""Keyed pseudonyms for identifiers read from file headers (PatientID, DICOM UIDs)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

KEY_VARIABLE = "ENRICH_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 16
DIGITS = 16  # hex digits kept: 64 bits, collision-free in practice below ~10^8 distinct values


def pseudonym(value: str, key: bytes) -> str:
    """The first 16 hex digits of HMAC-SHA256(key, value)."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:DIGITS]


def key_from_env() -> bytes:
    """The pseudonym key from ``ENRICH_PSEUDONYM_KEY``; a clear error when it is unset or short."""
    key = os.environ.get(KEY_VARIABLE, "")
    if not key:
        raise ValueError(
            f"the archive holds DICOM files whose headers identify patients and series: set {KEY_VARIABLE} "
            "to a secret of at least 16 characters (e.g. `export "
            f"{KEY_VARIABLE}=$(python -c 'import secrets; print(secrets.token_hex(32))')`, kept outside the run "
            "dir) to write keyed pseudonyms, or pass --no-pseudonymise to copy the identifiers as they are"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"{KEY_VARIABLE} is {len(key)} characters long: use a secret of at least {MIN_KEY_LENGTH}")
    return key.encode("utf-8")


def identifier_mapper(pseudonymise: bool) -> Callable[[str | None], str | None]:
    """Maps a header identifier to what the outputs hold: its pseudonym (default) or itself.

    The key is read from the environment on first use, so archives without DICOM headers need none.
    """
    if not pseudonymise:
        return lambda value: value or None
    cache: dict[str, str] = {}
    keys: list[bytes] = []

    def mapped(value: str | None) -> str | None:
        if not value:
            return None
        if value not in cache:
            if not keys:
                keys.append(key_from_env())
            cache[value] = pseudonym(value, keys[0])
        return cache[value]

    return mapped
