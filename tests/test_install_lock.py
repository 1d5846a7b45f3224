"""The install cannot drift: requirements.lock pins every package (with hashes), pyproject.toml's
requirements are met by it, and the environment running the tests holds exactly the lock.

The lock is made by scripts/lock.sh (pip-compile) and installed by scripts/venv.sh
(`pip install --require-hashes -r requirements.lock`, then the project itself without dependencies).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PROJECT = "lens-atlas"
# ensurepip's own, not a dependency of anything: it comes with the venv, whatever its version
NOT_LOCKED = {"pip"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_blocks() -> list[str]:
    """One block per locked package: its `name==version` line and its `--hash` lines."""
    blocks: list[str] = []
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            blocks[-1] += "\n" + line
        else:
            blocks.append(line)
    return blocks


def locked() -> dict[str, str]:
    """{normalized name: version} from requirements.lock."""
    pins: dict[str, str] = {}
    for block in _lock_blocks():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", block)
        assert m, f"not an exact pin in {LOCK.name}: {block.splitlines()[0]!r}"
        pins[_name(m[1])] = m[2]
    return pins


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees in its environment."""
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = _name(dist.metadata["Name"])
        if name in found and found[name] != dist.version:
            pytest.fail(
                f"{name} is installed twice ({found[name]} and {dist.version}): rebuild the venv"
            )
        found[name] = dist.version
    return found


def test_every_locked_package_is_pinned_with_a_hash() -> None:
    blocks = _lock_blocks()
    pins = locked()
    # every package once, the whole tree (not just the direct pins)
    assert len(pins) == len(blocks) > 50
    unhashed = [
        b.splitlines()[0] for b in blocks if not re.search(r"--hash=sha256:[0-9a-f]{64}", b)
    ]
    assert not unhashed, f"without a hash (pip --require-hashes would refuse the lock): {unhashed}"
    # the pins that the project depends on being exact (pyproject.toml), and the build backend for
    # `-e .`
    for name, version in {
        "torch": "2.14.1",
        "prefect": "3.8.8",
        "sqlalchemy": "2.0.58",
        "fastapi": "0.150.0",
    }.items():
        assert pins.get(name) == version, f"{name}: {pins.get(name)} locked, {version} wanted"
    assert "setuptools" in pins


def test_pyproject_requirements_are_met_by_the_lock() -> None:
    """A pyproject.toml edit without `scripts/lock.sh` fails here, before any install drifts."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["test"],
        *project["build-system"]["requires"],
    ]
    pins = locked()
    unmet = []
    for text in reqs:
        req = Requirement(text)
        version = pins.get(_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{text} (lock: {version})")
    assert not unmet, (
        "pyproject.toml and requirements.lock disagree; run scripts/lock.sh:\n" + "\n".join(unmet)
    )


def test_the_environment_holds_exactly_the_lock() -> None:
    """What CI (and everyone) tests with is what the lock says: nothing missing, extra or other."""
    pins, have = locked(), installed()
    assert have.get(PROJECT), f"{PROJECT} is not installed in {sys.prefix}"
    missing = sorted(f"{n}=={v}" for n, v in pins.items() if n not in have)
    other = sorted(
        f"{n}: {have[n]} installed, {v} locked"
        for n, v in pins.items()
        if n in have and have[n] != v
    )
    extra = sorted(
        f"{n}=={v}" for n, v in have.items() if n not in pins and n not in NOT_LOCKED | {PROJECT}
    )
    assert not (missing or other or extra), (
        f"{sys.prefix} is not requirements.lock (re-run scripts/venv.sh, or rebuild the venv):\n"
        f"missing: {missing}\ndifferent: {other}\nnot in the lock: {extra}"
    )


def test_the_venv_stamp_is_the_lock_it_was_installed_from() -> None:
    """scripts/venv.sh reinstalls when pyproject.toml or the lock changes: its stamp hashes both."""
    stamp = Path(sys.prefix) / ".lens-installed"
    if not stamp.exists():
        pytest.skip(f"{sys.prefix} was not made by scripts/venv.sh")
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + LOCK.read_bytes()).hexdigest()[
        :16
    ]
    assert stamp.read_text().strip() == want, (
        "the venv predates the current lock: source scripts/venv.sh"
    )
