"""What a fresh clone installs: `make` (and so CI) installs the versions the suite passed with, for every
dependency the project declares; the same seed then gives the same numbers on another machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, str]:
    lines = (ROOT / "requirements-lock.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}


def test_make_installs_the_locked_versions() -> None:
    recipe = (ROOT / "Makefile").read_text()
    assert "grep -v '^torch==' requirements-lock.txt > $(VENV)/constraints.txt" in recipe
    assert '-c $(VENV)/constraints.txt -e ".[test]"' in recipe
    assert "$(VENV)/.installed: pyproject.toml requirements-lock.txt" in recipe  # a new lock reinstalls


def test_every_declared_dependency_is_locked() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=\[;! ]", d, maxsplit=1)[0]).lower() for d in declared}
    names -= {"lorahpo"}  # an extra may name the project itself
    assert sorted(names - set(locked())) == []
