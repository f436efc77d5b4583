"""The import order of docs/decisions.md (Layering): nothing lower imports anything higher, and no
private name is imported across modules."""
import ast
from pathlib import Path

import kaviz

ROOT = Path(kaviz.__file__).parent
RANK = {"stats": 0, "metrics": 0, "losses": 0, "data": 0, "models": 1, "features": 2, "cache": 3, "train": 3,
        "methods": 4, "runs": 4, "pretrain": 4,  # pretrain builds the zoo (models.zoo) with train and methods.dense
        "analysis": 5, "embed": 5, "report": 6, "plots": 7, "widgets": 8, "notebook": 8,
        "runner": 9, "__main__": 9}
# documented in docs/decisions.md (Layering): the one upward call, lazy, inside cfl.Spaces.embed
ALLOWED_UP = {("kaviz.methods.cfl.spaces", "kaviz.embed")}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, ast.parse(path.read_text())


def _imports(name, is_pkg, tree):
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("kaviz"):
                yield target, [a.name for a in node.names], [a.asname for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kaviz"):
                    yield a.name, [], []


def _rank(module):
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_nothing_lower_imports_anything_higher():
    wrong = []
    for name, is_pkg, tree in _modules():
        mine = _rank(name)
        if mine is None:
            continue  # the package root (seed_everything, default_device) sits below and beside everything
        for target, names, _ in _imports(name, is_pkg, tree):
            if target == "kaviz":
                targets = [f"kaviz.{n}" for n in names if _rank(f"kaviz.{n}") is not None]
            else:
                targets = [target]
            for t in targets:
                theirs = _rank(t)
                if theirs is not None and theirs > mine and (name, ".".join(t.split(".")[:2])) not in ALLOWED_UP:
                    wrong.append(f"{name} imports {t}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for name, is_pkg, tree in _modules():
        for target, names, _ in _imports(name, is_pkg, tree):
            wrong += [f"{name}: from {target} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not wrong, "\n".join(wrong)


def test_methods_import_no_report_plots_or_widgets():
    for name, is_pkg, tree in _modules():
        if name.startswith("kaviz.methods"):
            for target, _names, _ in _imports(name, is_pkg, tree):
                assert not any(target.startswith(f"kaviz.{m}") for m in ("report", "plots", "widgets")), (name, target)
