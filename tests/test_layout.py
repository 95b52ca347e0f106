"""The direction of imports inside torchfast, read from the source with `ast` (nothing is imported):

    torchfast/reference/   imports neither torchfast.ops nor torchfast.triton
    torchfast/triton/      does not import torchfast.ops
    torchfast/ops/         imports torchfast.triton only inside functions (when Triton runs)
    export/_tables.py      does not import export/_onnx.py (_onnx.py imports _tables.py)

so references and shared helpers sit below both implementations and no two modules import each other.
Imports inside functions count too: a lazy import is still a cycle. Each failure names file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torchfast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, module: str | None, level: int) -> str:
    """The absolute module of `from <level dots><module> import ...` in `path`."""
    if level == 0:
        return module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, inside a function) for every module an import statement in `path` may load:
    `from a.b import c` counts as a.b and as a.b.c (c may be a submodule). Literal
    importlib.import_module("...") calls count as imports too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node.module, node.level)
            found.append((node.lineno, base, in_function))
            found.extend((node.lineno, f"{base}.{alias.name}", in_function) for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value, in_function))
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(folder: str, forbidden: tuple[str, ...], module_level_only: bool = False) -> list[str]:
    rule = f"nothing under torchfast/{folder}/ may import " + " or ".join(forbidden)
    if module_level_only:
        rule += " at module level"
    out = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        seen = set()  # one report per statement: `from a import b, c` yields a, a.b and a.c
        for line, module, in_function in _imports(path):
            if line in seen or (module_level_only and in_function):
                continue
            if any(_within(module, prefix) for prefix in forbidden):
                seen.add(line)
                out.append(f"{path.relative_to(ROOT)}:{line}: imports {module} ({rule})")
    return out


def _fail_on(violations: list[str]) -> None:
    if violations:
        pytest.fail("imports against the layout (see tests/test_layout.py):\n" + "\n".join(violations))


def test_reference_imports_neither_ops_nor_triton():
    _fail_on(_violations("reference", ("torchfast.ops", "torchfast.triton")))


def test_triton_does_not_import_ops():
    _fail_on(_violations("triton", ("torchfast.ops",)))


def test_ops_import_triton_only_inside_functions():
    # The op modules are imported by `import torchfast`; Triton is imported when a Triton kernel runs.
    _fail_on(_violations("ops", ("torchfast.triton",), module_level_only=True))


def test_onnx_tables_import_one_way():
    tables = PACKAGE / "export" / "_tables.py"
    bad: dict[int, str] = {}
    for line, module, _ in _imports(tables):
        if _within(module, "torchfast.export._onnx"):
            bad.setdefault(line, module)
    _fail_on([f"{tables.relative_to(ROOT)}:{line}: imports {module} (torchfast/export/_onnx.py imports "
              "_tables.py, so _tables.py must not import it back)" for line, module in sorted(bad.items())])
    onnx_imports = {module for _, module, _ in _imports(PACKAGE / "export" / "_onnx.py")}
    assert "torchfast.export._tables" in onnx_imports


def test_the_checker_sees_every_form_of_import(tmp_path, monkeypatch):
    """The parser itself: absolute, from-package, relative and lazy imports are all found."""
    pkg = tmp_path / "torchfast" / "triton"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "import torchfast.ops.rms_norm\n"
        "from torchfast import ops\n"
        "from ..ops import _norm\n"
        "from torchfast.opsx import fine\n"
        "def f():\n"
        "    from torchfast.ops.glu import g\n"
        "    importlib.import_module('torchfast.ops')\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "torchfast")
    lines = {v.split(":")[1] for v in _violations("triton", ("torchfast.ops",))}
    assert lines == {"1", "2", "3", "6", "7"}
    lines = {v.split(":")[1] for v in _violations("triton", ("torchfast.ops",), module_level_only=True)}
    assert lines == {"1", "2", "3"}
