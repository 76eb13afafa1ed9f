"""The import-layering check: every arrow points down (docs/architecture.md, "Layers").

    errors < model < adapters (qemu, storage, net, isolation, images) < core < ops < facades

A module may import its own layer or a lower one, with one exception: an operation module
imports no other operation (shared mechanics live in the core). Imports under TYPE_CHECKING
count too: a type from a higher layer is a dependency on it all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
RANKS = {"errors": 0, "model": 1, "qemu": 2, "storage": 2, "net": 2, "isolation": 2,
         "images": 2, "core": 3, "ops": 4, "host": 5, "cli": 5, "daemon": 5, "client": 5,
         "__init__": 5}
#: the remote client runs where no engine is (another machine, the fast CLI path)
CLIENT_MAY_NOT_IMPORT = ("core", "ops", "host", "daemon", "qemu", "isolation", "images", "net")


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "vmkit", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    relative = path.relative_to(SRC).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("vmkit.") or name == "vmkit"}


def _known(name: str) -> bool:
    """`from vmkit.ops import snapshots` names the module vmkit.ops.snapshots."""
    parts = name.split(".")
    return (SRC.joinpath(*parts).with_suffix(".py").exists()
            or SRC.joinpath(*parts, "__init__.py").exists())


def violations() -> list[str]:
    found = []
    for path in sorted((SRC / "vmkit").rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module) if module != "vmkit.__init__" else "__init__"
        for target in sorted(t for t in _imports(path) if _known(t) and t != "vmkit"):
            target_layer = _layer(target)
            if RANKS[target_layer] > RANKS[layer]:
                found.append(f"{module} ({layer}) imports {target} ({target_layer})")
            elif layer == "ops" == target_layer and target not in ("vmkit.ops", module):
                found.append(f"{module} imports another operation, {target}")
            elif layer == "client" and target_layer in CLIENT_MAY_NOT_IMPORT:
                found.append(f"{module} (the remote client) imports the engine's {target}")
    return found


def test_every_import_points_down() -> None:
    assert violations() == []


@pytest.mark.parametrize(("module", "target", "why"), [
    ("vmkit.qemu.fake", "vmkit.core.engine", "adapter imports the engine"),
    ("vmkit.ops.fake", "vmkit.host", "operation imports a facade"),
    ("vmkit.ops.fake", "vmkit.ops.snapshots", "operation imports an operation"),
    ("vmkit.model.fake", "vmkit.qemu.argv", "model imports an adapter"),
    ("vmkit.client.fake", "vmkit.core.engine", "the remote client imports the engine"),
])
def test_the_check_catches_an_arrow_up(module: str, target: str, why: str) -> None:
    fake = SRC.joinpath(*module.split(".")).with_suffix(".py")
    fake.write_text(f"import {target}\n")
    try:
        assert any(module in v and target in v for v in violations()), why
    finally:
        fake.unlink()
