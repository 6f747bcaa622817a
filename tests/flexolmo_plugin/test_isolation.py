"""Product modules stay free of CUDA-only calls; only flexolmo_plugin/compat.py may touch torch.cuda."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("flexolmo_plugin", "conversion", "recipes")
ALLOWED = {ROOT / "flexolmo_plugin" / "compat.py"}


def _cuda_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "cuda" or (isinstance(node.value, ast.Attribute) and node.value.attr == "cuda"):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cuda"):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno} ({node.value!r})")
    return hits


def test_only_the_compat_module_touches_cuda():
    files = [p for pkg in PRODUCT_PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 5
    offenders = [hit for p in files if p not in ALLOWED for hit in _cuda_uses(p)]
    assert not offenders, f"CUDA-only calls outside flexolmo_plugin/compat.py: {offenders}"


def test_the_scanner_finds_cuda_calls(tmp_path):
    sample = ROOT / "flexolmo_plugin" / "compat.py"
    assert _cuda_uses(sample), "compat.py uses torch.cuda, so the scanner must see it"
