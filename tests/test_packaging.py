"""constraints.txt, the tested set, against pyproject.toml and the environment the tests run in.

pyproject.toml gives ranges; constraints.txt pins what `make test` and the benchmarks proved.
A range widened or a dependency added without `make lock` would install an untested version
on a device (or none at all: pip refuses a constraint outside the range).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins(text: str) -> dict[str, str]:
    """name -> pinned version, of a pip constraints file; anything but `name==version` fails."""
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier or [None]
        assert spec is not None and spec.operator == "==" and not req.marker, (
            f"constraints.txt:{number}: {line!r} is not a plain pin (name==version)"
        )
        name = canonicalize_name(req.name)
        assert name not in found, f"constraints.txt:{number}: {req.name} pinned twice"
        found[name] = spec.version
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for e in extras for r in e)]]


def test_every_dependency_is_pinned_inside_its_range() -> None:
    pinned = pins((ROOT / "constraints.txt").read_text())
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"pyproject.toml needs {req}; constraints.txt does not pin it"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}"
        )


def test_the_tests_run_on_the_tested_set() -> None:
    """`make test` installs with the constraints; a venv older than them is reinstalled by
    make (constraints.txt is a prerequisite of its stamp), so a mismatch here is a bug."""
    pinned = pins((ROOT / "constraints.txt").read_text())
    off = []
    for req in requirements():
        name = canonicalize_name(req.name)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            off.append(f"{req.name}: not installed")
            continue
        if installed != pinned[name]:
            off.append(f"{req.name}: {installed} installed, {pinned[name]} pinned")
    assert not off, "; ".join(off)


def test_pins_reject_what_is_not_a_plain_pin() -> None:
    for bad in ("numpy>=2", "numpy==2.4.6; python_version < '3.12'", "numpy\nnumpy==1"):
        try:
            pins(bad)
        except AssertionError as exc:
            assert "constraints.txt:" in str(exc)
        else:
            raise AssertionError(f"{bad!r} taken for a pin")
    assert pins("# the tested set\nNumPy==2.4.6  # why\n\n") == {"numpy": "2.4.6"}
