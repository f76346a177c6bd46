"""The README's examples run as written.

Every ```python block of the sections listed here is executed in a fresh namespace (the
sections whose examples are not yet self-contained are not listed).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["## The encoder stage"]


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    out = []
    for heading in SECTIONS:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        section = text[start : end if end != -1 else len(text)]
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", section, re.S)):
            out.append((f"{heading[3:]} #{i + 1}", code))
    return out


@pytest.mark.parametrize("name, code", _blocks(), ids=[name for name, _ in _blocks()])
def test_readme_example_runs(name, code):
    exec(compile(code, f"README.md: {name}", "exec"), {"__name__": "__readme__"})
