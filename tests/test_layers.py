"""Imports only point down the layers: base ← store ← stage framework ← stage helpers ← stages ← flows (Prefect) ← CLI."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO_ROOT

# Lowest first; a module may import its own layer and the ones below.
LAYERS = (
    ("base", ("stages", "stages.base")),
    ("store", ("stages.store",)),
    ("tracking", ("stages.tracking",)),
    ("stage framework", ("stages.core",)),
    (
        "stage helpers",
        tuple(
            f"stages.{p}"
            for p in ("data", "evaluation", "promotion", "report", "sample_models", "scan", "selection", "training", "weights")
        ),
    ),
    ("stages", tuple(f"stages.{s}" for s in ("download", "snr_scan", "layer_select", "cpt", "sft", "evaluate", "promote", "compare"))),
    ("flows", ("flows",)),
    ("cli", ("spectrum_cli",)),
)
PACKAGES = ("stages", "flows", "spectrum_cli")


def layer_of(module: str) -> int:
    """The layer of the most specific prefix that names `module` (stages.store.lease -> store)."""
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-level ones too; relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from . import x` / `from stages import cpt` import modules: count the names too
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES or name.split(".")[0] == "prefect"]


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_every_import_points_down_the_layers():
    modules = project_modules()
    upward = []
    for module, path in modules.items():
        own = layer_of(module)
        for line, imported in imports_of(path, module):
            if imported.split(".")[0] == "prefect":
                if own < layer_of("flows"):
                    upward.append(f"{path.relative_to(REPO_ROOT)}:{line} imports prefect (only flows and the CLI do)")
                continue
            target = imported if imported in modules else imported.rpartition(".")[0]
            if target in modules and layer_of(target) > own:
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} ({LAYERS[own][0]}) imports {imported} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a store module importing the stage framework is found (relative imports resolved)."""
    path = tmp_path / "lease.py"
    path.write_text(
        "from ..core.stage import StageContext\nfrom stages import evaluate\n\ndef f():\n    from flows.pipeline import run_pipeline\n"
    )
    imported = [name for _, name in imports_of(path, "stages.store.lease")]
    assert "stages.core.stage" in imported and "flows.pipeline" in imported and "stages.evaluate" in imported
    assert layer_of("stages.core.stage") > layer_of("stages.store.lease") and layer_of("flows.pipeline") > layer_of("stages.store.lease")
