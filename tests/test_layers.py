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
