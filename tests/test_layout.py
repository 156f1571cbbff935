"""The package's shape: no import cycles, light entry points, nothing from the deployment folder."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dinopatch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}
# Compiled modules (dinopatch._C, _C_cuda, _bench_C): modules too, whether built here or not.
EXTENSIONS = {f"dinopatch.{n}" for n in ("_C", "_C_cuda", "_bench_C")}


def _from_base(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module a ``from ... import`` names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{anchor}.{base}" if base else anchor
    return base


def _imports(path: Path, tree: ast.Module | None = None) -> set[str]:
    """Modules of the package a module imports, at its top or inside its functions (a lazy import runs too)."""
    name = _module_name(path)
    found = set()
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, path)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    # A module's own packages are imported before it, whatever it says: `from . import x` is no cycle.
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name and m not in ancestors}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path, tree: ast.Module | None = None) -> list[str]:
    """Where a module uses another module's private name: ``from .x import _name``, ``x._name`` with ``x``
    a module of the package, or ``obj._name`` where this module defines no ``_name`` (a reach-in, such as
    ``det._fitted()`` or ``det._engines = ...`` outside the detector).  Private modules may be imported."""
    name, tree = _module_name(path), tree or ast.parse(path.read_text())
    modules, own, found = {}, set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            own.add(node.attr)
        elif isinstance(node, ast.Import):
            modules.update({a.asname or a.name.split(".")[0]: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, path)
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES or full in EXTENSIONS:
                    modules[a.asname or a.name] = full
                elif _private(a.name) and base.startswith("dinopatch") and base != name:
                    found.append(f"{path}:{node.lineno}: from {base} import {a.name}")
                own.add(a.asname or a.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else None
        if owner in modules and modules[owner] != name:
            found.append(f"{path}:{node.lineno}: {owner}.{node.attr} of {modules[owner]}")
        elif owner not in ("self", "cls") and node.attr not in own:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)} reaches into another module's object")
    return found


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert len(graph) > 20  # the walk saw the package


def test_the_layout_reads_lazy_imports():
    tree = ast.parse("def f():\n    from .onnx_export import export_onnx\n")
    assert _imports(PACKAGE / "backbone" / "onnx_engine.py", tree) == {"dinopatch.backbone.onnx_export"}


def test_no_module_uses_another_modules_private_name():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in private_uses(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("code, hits", [
    ("from .synthetic import _pose\n", 1),
    ("from dinopatch import kernels\nkernels._C.isa()\n", 1),
    ("def f(det):\n    det._fitted()\n    det._engines = 1\n", 2),
    ("from . import _C\nclass A:\n    def f(self, other):\n        self._x = other._x\n", 0),
])
def test_private_uses_are_seen(code, hits):
    assert len(private_uses(PACKAGE / "stream.py", ast.parse(code))) == hits


def test_kernels_import_alone():
    code = ("import sys, dinopatch.kernels; "
            "print(sorted(m for m in ('cv2', 'dinopatch.detector', 'torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_imports_the_deployment_folder_or_hooks_imports():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "export":
                pytest.fail(f"{path} imports the deployment folder")
        assert "meta_path" not in text, path
    assert not (ROOT / "export" / "__init__.py").exists()
