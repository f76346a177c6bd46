"""The shape of the code, as issue 17 left it: checked so that it stays so.

- No function takes or passes 15 or more positional arguments, outside Triton kernels
  (their signatures and launches list pointers, strides and sizes by design): an
  attention call is an ``AttentionCall`` record, not an argument list.
- The package's modules import one another without cycles (module-level imports; an
  import inside a function runs when called, after every module has loaded).
- The attention record's field list is the argument list of the C++ ops too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import dsr_kernels
from dsr_kernels.attention_call import schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsr_kernels"
MAX_POSITIONAL = 14
# Signatures that are another library's public contract, positional arguments included:
# a drop-in must accept what the original accepts.
MIRRORS = {
    ("dsr_kernels/ops/attention_dropin.py", "flash_attn_varlen_func"),  # flash-attn 2's signature
    ("dsr_kernels/modules/attention.py", "__init__"),  # timm's Attention(dim, num_heads, ...)
}


def _python_files():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _is_triton_jit(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def _long_lists(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(ROOT))
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _is_triton_jit(node):  # Triton kernels and their helpers: pointers, strides, sizes
                return
            n = len(node.args.posonlyargs) + len(node.args.args)
            if n > MAX_POSITIONAL and (rel, node.name) not in MIRRORS:
                found.append(f"{rel}:{node.lineno} def {node.name} takes {n} positional arguments")
        elif isinstance(node, ast.Call) and not isinstance(node.func, ast.Subscript):  # kernel[grid](...): a launch
            n = sum(1 for a in node.args if not isinstance(a, ast.Starred))
            if n > MAX_POSITIONAL:
                found.append(f"{rel}:{node.lineno} passes {n} positional arguments")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_function_takes_or_passes_15_positional_arguments():
    found = [line for f in _python_files() for line in _long_lists(f)]
    assert not found, "\n".join(found)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: the package, node.level - 1 levels up
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    found.add(target if target in modules else base)
            elif isinstance(node, (ast.If, ast.Try)):  # (guarded imports still run at import time)
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return {m for m in found if m in modules and m != name}


def test_package_modules_import_without_cycles():
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}
    modules = set(files)
    graph = {name: _module_level_imports(path, name, modules) for name, path in files.items()}
    # Edges into a package's __init__ (``from dsr_kernels import _C``, re-exported names)
    # are left out: a submodule runs while its package initialises, which is how Python
    # packages work; the cycles that break imports are between modules.
    packages = _packages(files)
    graph = {name: {m for m in deps if m not in packages} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _packages(files: dict[str, Path]) -> set[str]:
    return {name for name, path in files.items() if path.name == "__init__.py"}


@pytest.mark.skipif(
    dsr_kernels.explain("attention", "cpu")["cpu"] != "available", reason="the compiled extension is not built"
)
def test_cpu_ops_take_the_attention_call_fields_in_order():
    """csrc/cpu/attention.cpp's kAttentionArgsSchema is AttentionCall's field list."""
    fields = [a.strip() for a in schema().split(",")]
    fwd = torch.ops.dsr_kernels.attention_fwd_cpu.default._schema
    bwd = torch.ops.dsr_kernels.attention_bwd_cpu.default._schema

    def spelled(args):
        return [f"{a.type}".replace("Optional[Tensor]", "Tensor?") + f" {a.name}" for a in args]

    assert spelled(fwd.arguments[: len(fields)]) == fields
    assert spelled(bwd.arguments[3 : 3 + len(fields)]) == fields


def _private_imports(path: Path, modules: set[str]) -> list[str]:
    """``from dsr_kernels.x import _name`` where _name is not a module: another module's private name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsr_kernels"):
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{node.module}.{alias.name}" not in modules and alias.name != "_C":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    """The package's modules use each other's public names (private modules such as
    _extension and the compiled _C may be imported; their private names may not)."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}
    found = [line for path in files.values() for line in _private_imports(path, set(files))]
    assert not found, "\n".join(found)
