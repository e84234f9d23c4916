"""The scan helpers sit below the snr_scan stage: nothing in stages/scan imports a stage module, not even for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import stages
from stages.scan.engine import ScanSettings
from stages.snr_scan import ScanConfig

SCAN = Path(stages.__file__).parent / "scan"
STAGE_MODULES = {"snr_scan", "layer_select", "download", "cpt", "sft", "evaluate", "compare", "core", "flows", "spectrum_cli"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved against the stages package), TYPE_CHECKING blocks included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("stages.scan" if node.level == 1 else "stages") if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_no_scan_helper_imports_a_stage_module():
    wrong = {
        f"{path.name}: {module}"
        for path in sorted(SCAN.glob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in STAGE_MODULES or (module.startswith("stages.") and module.split(".")[1] in STAGE_MODULES)
    }
    assert not wrong


def test_the_stage_hands_the_engine_its_settings():
    config = ScanConfig(model_dir="m", model_id="tiny", estimator="gavish-donoho", include=["mlp"], exclude=["k_proj"], workers=2)
    assert config.settings() == ScanSettings("tiny", "gavish-donoho", "gram", ("mlp",), ("k_proj",), 2)
