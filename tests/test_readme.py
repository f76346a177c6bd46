"""Every ```python block of README.md and of docs/*.md runs as written.

Each block runs in a fresh namespace, in a temporary working directory (examples write
plots and bench folders there). A block whose first line is
``# needs: <requirement>[, <requirement>]`` is skipped, naming what is missing, when a
requirement is not met:

- ``cuda``: torch.cuda.is_available() is False (asked when the test runs, not at import);
- ``checkpoint <file> [(note)]``: <file> is not in the repository root (when it is, the
  block runs there, so that its relative path resolves);
- ``timm`` / ``diffusers``: the package cannot be imported (timm through the test suite's
  importer, which stands in for a torchvision that cannot be installed beside a CPU torch).

A ``timm`` block runs in a fresh Python process: it must import timm the way it tells the
reader to (docs/integrations.md), with nothing this test process imported before.

Test ids name the file and the nearest heading: ``docs/attention.md:nan-and-inf-1``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FILES = [README, *DOCS]
# The examples of each file at the time of writing: extraction must not silently find fewer.
MIN_BLOCKS = {
    "README.md": 3,
    "docs/attention.md": 3,
    "docs/benchmarks.md": 1,
    "docs/distributed.md": 1,
    "docs/encoder.md": 3,
    "docs/integrations.md": 5,
    "docs/models.md": 5,
    "docs/monitor.md": 1,
    "docs/norm_modulate.md": 1,
    "docs/quantization.md": 2,
}
SUBPROCESS_TIMEOUT_S = 900  # a timm block on a loaded 2-core machine


class Block(NamedTuple):
    file: str  # relative to the repository root: "README.md", "docs/attention.md"
    name: str  # "<file>:<heading slug>-<index under that heading>"
    line: int  # of the opening fence in the file
    code: str


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", heading.lower()).strip("-")


def _blocks(path: Path) -> list[Block]:
    """Every ```python block of one file, named by the nearest heading above it (any level) and its index there."""
    rel = _rel(path)
    blocks: list[Block] = []
    heading, index, start = path.stem.lower(), 0, 0
    code: list[str] | None = None  # the lines of the python block being read
    in_other_block = False  # inside a non-python block, whose "#" lines are not headings
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if code is not None:
            if line.strip() == "```":
                index += 1
                blocks.append(Block(rel, f"{rel}:{_slug(heading)}-{index}", start, "\n".join(code) + "\n"))
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
    assert code is None, f"{rel}: the ```python block opened at line {start} is not closed"
    return blocks


BLOCKS = [b for path in FILES for b in _blocks(path)]


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
        f"unknown requirement {requirement!r} in a '# needs:' line (expected cuda, checkpoint FILE, timm, diffusers)"
    )


def test_every_file_has_its_python_examples():
    found = {_rel(path): len(_blocks(path)) for path in FILES}
    for name, least in MIN_BLOCKS.items():
        assert name in found, f"{name} is gone; update MIN_BLOCKS in {__file__}"
        assert found[name] >= least, f"found {found[name]} ```python blocks in {name}, expected >= {least}"
    names = [b.name for b in BLOCKS]
    assert len(set(names)) == len(names), [n for n in names if names.count(n) > 1]


def _links(path: Path) -> list[tuple[int, str, str]]:
    """(line, file, anchor) of every relative markdown link or image outside code blocks ("" for none)."""
    links, fence = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            fence = not fence
        if fence:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if not re.match(r"[a-z]+:", target):
                file, _, anchor = target.partition("#")
                links.append((number, file, anchor))
    return links


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("path", [*FILES, ROOT / "benchmarks" / "results" / "RESULTS.md"], ids=_rel)
def test_relative_links_resolve(path: Path):
    broken = []
    for number, file, anchor in _links(path):
        target = path.parent / file if file else path
        if not target.exists():
            broken.append(f"line {number}: {file} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"line {number}: {file}#{anchor}: no such heading")
    assert not broken, f"{_rel(path)} has broken links: {broken}"


def test_readme_links_every_doc():
    linked = {(README.parent / file).resolve() for _, file, _ in _links(README) if file}
    assert not [d for d in DOCS if d.resolve() not in linked], "README.md does not link to every docs/*.md"


def _shell(command: str) -> str:
    """A shell command as the README writes it: ``python3 -m pip`` is ``pip``, no comment, single spaces."""
    command = re.sub(r"\s+#.*$", "", command.strip())
    command = re.sub(r"\bpython3? -m (pip|pytest)\b", r"\1", command)
    return " ".join(command.split())


def test_readme_commands_are_the_ones_ci_runs():
    """The quick start's test command and the integrations' installs are lines of .ci/run (keep them in step)."""
    ci_lines = [_shell(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_parts = {part.strip() for line in ci_lines for part in line.split("&&")}
    bash = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    test_commands = [_shell(b) for b in bash if b.strip().endswith("pytest")]
    assert len(test_commands) == 1, f"expected one ```bash block of README.md ending in pytest, found {test_commands}"
    assert test_commands[0] in ci_lines, f"README.md's test command is not a line of .ci/run: {test_commands[0]}"
    installs = [_shell(part) for b in bash if "timm" in b for part in b.split("&&")]
    assert installs, "README.md has no ```bash block that installs timm"
    assert not [c for c in installs if c not in ci_parts], f".ci/run does not install {installs} as README.md does"


def _run_in_fresh_process(block: Block, workdir: Path) -> None:
    script = workdir / f"{Path(block.file).stem}_line{block.line}.py"
    script.write_text("\n" * block.line + block.code)  # padded: tracebacks give the file's own line numbers
    done = subprocess.run(
        [sys.executable, str(script)], cwd=workdir, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"{block.file} line {block.line} failed in a fresh process (exit {done.returncode}):\n"
        f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_example_runs(block: Block, tmp_path, monkeypatch):
    workdir = tmp_path
    requirements = _requirements(block.code)
    for requirement in requirements:
        reason, where = _missing(requirement)
        if reason is not None:
            pytest.skip(f"{block.file} line {block.line}: {reason}")
        workdir = where or workdir
    if "timm" in requirements:
        _run_in_fresh_process(block, workdir)
        return
    monkeypatch.chdir(workdir)
    # Padded so that tracebacks give the file's own line numbers.
    code = compile("\n" * block.line + block.code, str(ROOT / block.file), "exec")
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
