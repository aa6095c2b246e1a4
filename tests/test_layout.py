"""The package's parts import only what lies below them, and the scripts around it import the
package, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Bottom to top: a part may import its own modules and those of the parts before it.
LAYERS = ["errors", "cpus", "files", "config", "models", "data", "cluster", "telemetry", "checkpointing", "inference",
          "formats", "training", "cli", "__main__"]


def gptcore_imports(path: Path) -> set[str]:
    """The gptcore parts a file imports, at its top or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gptcore":
            names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            parts.update(names)
        elif isinstance(node, ast.Import):
            parts.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("gptcore."))
    return parts


def test_every_part_imports_only_the_parts_below_it():
    package = REPO / "gptcore"
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        part = relative.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in LAYERS, f"{relative}: a part the layering does not place; add it to LAYERS"
        above = [name for name in gptcore_imports(path) if LAYERS.index(name) > LAYERS.index(part)]
        assert not above, f"gptcore/{relative} imports {', '.join(above)}, which lie above {part}"


def test_the_scripts_around_the_package_are_never_imported_by_it():
    for path in sorted((REPO / "gptcore").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m.split(".")[0] in ("launch", "analysis", "bench", "tests") for m in modules), path
