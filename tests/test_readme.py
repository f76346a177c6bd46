"""Every ```python block of README.md runs as written.

Each block runs in a fresh namespace, in a temporary working directory (examples write
plots there). A block whose first line is ``# needs: <requirement>[, <requirement>]`` is
skipped, naming what is missing, when a requirement is not met:

- ``cuda``: torch.cuda.is_available() is False (asked when the test runs, not at import);
- ``checkpoint <file> [(note)]``: <file> is not in the repository root (when it is, the
  block runs there, so that its relative path resolves);
- ``timm`` / ``diffusers``: the package cannot be imported (timm through the test suite's
  importer, which stands in for a torchvision that cannot be installed beside a CPU torch).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MIN_BLOCKS = 10  # the README's examples at the time of writing; extraction must not silently find fewer


class Block(NamedTuple):
    name: str  # "<heading slug>-<index under that heading>"
    line: int  # of the opening fence in README.md
    code: str


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", heading.lower()).strip("-")


def _blocks() -> list[Block]:
    """Every ```python block of README.md, named by the nearest heading above it (any level) and its index there."""
    blocks: list[Block] = []
    heading, index, start = "readme", 0, 0
    code: list[str] | None = None  # the lines of the python block being read
    in_other_block = False  # inside a non-python block, whose "#" lines are not headings
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if code is not None:
            if line.strip() == "```":
                index += 1
                blocks.append(Block(f"{_slug(heading)}-{index}", start, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        elif in_other_block:
            in_other_block = line.strip() != "```"
        elif line.startswith("```python"):
            code, start = [], number
        elif line.startswith("```"):
            in_other_block = True
        elif line.startswith("#"):
            heading, index = line.lstrip("#").strip(), 0
    assert code is None, f"README.md: the ```python block opened at line {start} is not closed"
    return blocks


BLOCKS = _blocks()


def _requirements(code: str) -> list[str]:
    first = code.lstrip("\n").split("\n", 1)[0]
    match = re.match(r"#\s*needs:\s*(.+)$", first)
    if match is None:
        return []
    return [r.strip() for r in re.split(r",\s*(?![^()]*\))", match.group(1)) if r.strip()]


def _missing(requirement: str) -> tuple[str | None, Path | None]:
    """(why the requirement is not met, or None; the directory the block must run in, if any)."""
    if requirement == "cuda":
        if not torch.cuda.is_available():
            return "needs: cuda (torch.cuda.is_available() is False on this machine)", None
        return None, None
    if requirement == "timm":
        from timm_import import import_timm

        return (None if import_timm()[0] is not None else f"needs: timm ({import_timm()[1]})"), None
    if requirement == "diffusers":
        import importlib.util

        return (None if importlib.util.find_spec("diffusers") else "needs: diffusers (not installed)"), None
    match = re.fullmatch(r"checkpoint\s+(\S+)(\s+\(.*\))?", requirement)
    if match is not None:
        path = ROOT / match.group(1)
        if not path.is_file():
            return f"needs: checkpoint {match.group(1)} (not found in {ROOT})", None
        return None, ROOT
    pytest.fail(
        f"README.md: unknown requirement {requirement!r} in a '# needs:' line "
        "(expected cuda, checkpoint FILE, timm, diffusers)"
    )


def test_readme_has_python_examples():
    assert len(BLOCKS) >= MIN_BLOCKS, f"found {len(BLOCKS)} ```python blocks in {README}, expected >= {MIN_BLOCKS}"
    names = [b.name for b in BLOCKS]
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_example_runs(block: Block, tmp_path, monkeypatch):
    workdir = tmp_path
    for requirement in _requirements(block.code):
        reason, where = _missing(requirement)
        if reason is not None:
            pytest.skip(f"README.md line {block.line}: {reason}")
        workdir = where or workdir
    monkeypatch.chdir(workdir)
    # Padded so that tracebacks give README.md's own line numbers.
    code = compile("\n" * block.line + block.code, str(README), "exec")
    exec(code, {"__name__": "__readme__"})  # a fresh namespace per block


def test_needs_marker(monkeypatch):
    assert _requirements("import torch\n") == []
    code = "# needs: cuda, checkpoint DiT-XL-2-256x256.pt (DiT's release, 2.7 GB)\nimport torch\n"
    assert _requirements(code) == ["cuda", "checkpoint DiT-XL-2-256x256.pt (DiT's release, 2.7 GB)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in _missing("cuda")[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _missing("cuda") == (None, None)
    reason, _ = _missing("checkpoint no-such-file.pt (a note)")
    assert "no-such-file.pt" in reason and "not found" in reason
