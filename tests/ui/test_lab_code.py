"""The lab's code stays small: no module in lab/ over 400 lines, no function over radon complexity 15."""
from __future__ import annotations

from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "lab"
MODULES = sorted(LAB.rglob("*.py"))


def test_no_lab_module_is_over_400_lines():
    lengths = {str(p.relative_to(LAB)): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def test_no_lab_function_is_over_complexity_15():
    radon = pytest.importorskip("radon.complexity")
    offenders = {}
    for path in MODULES:
        for block in radon.cc_visit(path.read_text(encoding="utf-8")):  # functions, classes and methods
            if block.complexity > 15:
                offenders[f"{path.relative_to(LAB)}:{block.fullname}"] = block.complexity
    assert offenders == {}
