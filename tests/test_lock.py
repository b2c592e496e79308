"""The lock file (requirements/lock.txt) and pyproject.toml agree, and the commands that use the lock say so.

pyproject.toml holds honest ranges for people installing the package into their own environments;
the lock holds the exact versions the suite is tested with. Every requirement the package and its
test extra declare must be locked, at a version inside its declared range.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def read_lock(text: str) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"requirements/lock.txt line {number} is not an exact pin 'name==version': {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements/lock.txt pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def declared(extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def lock_disagreements(pins: dict[str, Version], reqs: list[Requirement]) -> list[str]:
    """Each declared requirement (that applies on this platform) not locked, or locked outside its range."""
    env = default_environment()
    problems = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({**env, "extra": "test"}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is declared in pyproject.toml but not locked")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is locked outside the declared range {req}")
    return problems


def test_every_declared_requirement_is_locked_inside_its_range() -> None:
    pins = read_lock(LOCK.read_text())
    assert lock_disagreements(pins, declared()) == []
    # the torch pin is the CPU build that lies on the machines' disk (a newer one pulls CUDA wheels)
    assert pins["torch"] == Version("2.13.0")


def test_the_check_finds_a_missing_or_out_of_range_pin() -> None:
    reqs = [Requirement("numpy>=1.26"), Requirement("s3fs[boto3]>=2024.2"), Requirement("faiss-gpu>=1.8")]
    pins = read_lock("numpy==1.25.0\nS3FS==2026.9.0\n")
    assert lock_disagreements(pins, reqs) == [
        "numpy==1.25.0 is locked outside the declared range numpy>=1.26",
        "faiss-gpu>=1.8 is declared in pyproject.toml but not locked",
    ]


def test_the_s3_client_stack_comes_from_one_place() -> None:
    """boto3 is never asked for on its own: aiobotocore's extra chooses the boto3 that matches its botocore."""
    reqs = declared()
    assert not {canonicalize_name(r.name) for r in reqs} & {"boto3", "botocore", "aiobotocore"}
    assert any(r.name == "s3fs" and "boto3" in r.extras for r in reqs)


def test_commands_install_with_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:2]
    assert len(commands) == 2 and "enrich demo" in commands[0] and "pytest" in commands[1]
    for command in commands:
        assert "-c requirements/lock.txt" in command
    assert "-c requirements/lock.txt" in (ROOT / ".ci" / "run").read_text()
    assert "requirements/refresh.sh" in readme
