"""The installed package is the source tree: every subpackage is listed for the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

SHIM = Path(__file__).resolve().parents[1] / "pyshim"


def test_every_subpackage_is_in_the_wheel():
    listed = set(tomllib.loads((SHIM / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(SHIM).parts)
        for init in (SHIM / "autozyme").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found == listed, f"pyproject.toml lists {sorted(listed)}, the tree has {sorted(found)}"
