"""Dependencies between psearch's packages point one way: each imports only the packages below
it, so that each can be built, tested and deployed without those above it (the service image
holds no training code it would run, the indexer none of the service)."""

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]

# What each package may import of psearch's own, besides itself. ``server`` takes the runtime of
# ``export``, nothing else of it: loading a model folder, not making one.
ALLOWED = {
    "common": set(),
    "models": {"common"},
    "training": {"common", "models"},
    "export": {"common", "models"},
    "indexer": {"common", "models", "export"},
    "server": {"common", "indexer", "export.runtime"},
}
OURS = {*ALLOWED, "demo", "benchmarks", "tests"}


def imported_modules(path: Path) -> set[str]:
    """Every psearch module a file imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.update(
                [node.module]
                if node.module != "export"
                else [f"export.{alias.name}" for alias in node.names]
            )
    return {module for module in modules if module.split(".")[0] in OURS}


def allowed(module: str, package: str) -> bool:
    return any(
        module == name or module.startswith(f"{name}.") for name in {package, *ALLOWED[package]}
    )


@pytest.mark.parametrize("package", ALLOWED)
def test_a_package_imports_only_the_packages_below_it(package):
    wrong = {
        f"{path.relative_to(REPOSITORY)}: {module}"
        for path in sorted((REPOSITORY / package).rglob("*.py"))
        for module in imported_modules(path)
        if not allowed(module, package)
    }
    assert not wrong, f"{package} may import {sorted(ALLOWED[package])}: {sorted(wrong)}"
