"""The layering rules of DESIGN.md, enforced: only dnet.runtime imports mlx."""

from __future__ import annotations

import ast
from pathlib import Path

import dnet

PACKAGE = Path(dnet.__file__).parent
HEAVY = ("mlx", "mlx_lm")
PURE = {"protocol": ("trio", "mlx", "mlx_lm"), "solver": ("trio", "mlx", "mlx_lm")}


def imported_roots(file: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_runtime_imports_mlx():
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        rel = file.relative_to(PACKAGE)
        if rel.parts[0] == "runtime":
            continue
        if imported_roots(file) & set(HEAVY):
            offenders.append(str(rel))
    assert offenders == []


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = PACKAGE.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(file: Path) -> set[str]:
    """Absolute module names ``file`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def reachable(start: str) -> dict[str, str]:
    """Every module ``start`` can import, directly or through dnet's own modules
    (function-level imports included), each with the dnet module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        file = _module_file(name)
        if file is None:
            continue
        for imported in imported_modules(file):
            if imported not in seen:
                seen[imported] = name
                if imported.split(".")[0] in ("dnet", "tui"):
                    todo.append(imported)
    return seen


def test_the_head_reaches_no_mlx_even_through_other_modules():
    # What the head process runs: the console entry point, the head, the API, and
    # the model files it reads. None may lead to MLX, mlx_lm or transformers.
    starts = ["dnet.cli_console"] + [
        f"dnet.{f.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}"
        for package in ("head", "api", "models")
        for f in (PACKAGE / package).rglob("*.py")
    ]
    heavy = ("mlx", "mlx_lm", "transformers", "torch")
    offenders = {
        f"{start}: {module} (imported by {by})"
        for start in starts
        for module, by in reachable(start).items()
        if module.split(".")[0] in heavy
    }
    assert offenders == set()


def test_pure_packages_import_no_io_or_mlx():
    for package, banned in PURE.items():
        for file in (PACKAGE / package).rglob("*.py") if (PACKAGE / package).exists() else []:
            assert not imported_roots(file) & set(banned), file


def test_runtime_init_stays_light():
    # dnet.runtime.blas must be importable before mlx.core.
    assert not imported_roots(PACKAGE / "runtime" / "__init__.py") & set(HEAVY)
    assert not imported_roots(PACKAGE / "runtime" / "blas.py") & set(HEAVY)


def test_the_console_talks_to_the_head_over_http_only():
    # tui/ may not reach into the head: everything it shows comes from the API.
    tui = PACKAGE.parent / "tui"
    for file in tui.rglob("*.py"):
        assert not imported_roots(file) & {"dnet", "mlx", "mlx_lm", "quart", "hypercorn"}, file


def test_only_the_entry_points_wire_the_console_in():
    users = [
        str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if "tui" in imported_roots(f)
    ]
    assert users == ["cli_console.py"]


def test_functions_stay_short_and_the_head_and_api_modules_small():
    # House rules: a function past 60 lines is split by concern (the solver's
    # algorithm is one piece); head and API modules stay under 300 lines.
    long = []
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{file.relative_to(PACKAGE)}:{node.name}"
                if size > 60 and name != "solver/solve.py:solve":
                    long.append(f"{name} ({size})")
    assert long == []
    big = [
        f"{f.relative_to(PACKAGE)} ({n})"
        for package in ("head", "api")
        for f in (PACKAGE / package).rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 300
    ]
    assert big == []
