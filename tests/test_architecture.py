"""The architecture's rules, checked (README "Architecture").

* the layers of ``flexolmo_plugin`` import one way (import-linter contract in ``setup.cfg``);
* no tensor name is spelled outside ``conversion/mapping.py``, the one table of tensors;
* the wheel installs exactly one top-level package, ``flexolmo_plugin``;
* importing the model patches nothing in ``torch`` (the CPU shims are applied on request only);
* nothing imports the repository folders ``conversion``/``recipes`` as top-level packages;
* imports deferred into functions are for optional dependencies only;
* ruff reports nothing.

The source scans parse files (``ast``); they import nothing of the package.
"""

from __future__ import annotations

import ast
import configparser
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "flexolmo_plugin"
# Folders whose modules make up the installed package (the others are mapped by package_dir).
PACKAGE_FOLDERS = ("flexolmo_plugin", "conversion", "recipes")
# Everything in the repository that holds Python code importing the package.
ALL_CODE_FOLDERS = PACKAGE_FOLDERS + ("tests", "benchmarks", "launchers")
MAPPING_FILE = REPO / "conversion" / "mapping.py"


# ------------------------------------------------------------------------------------------ helpers
def _package_dirs() -> dict[str, Path]:
    """Dotted package -> repository folder, as setup.cfg's ``package_dir`` maps them."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    dirs = {ROOT_PACKAGE: REPO / ROOT_PACKAGE}
    for line in cfg.get("options", "package_dir", fallback="").splitlines():
        if "=" in line:
            package, folder = (part.strip() for part in line.split("=", 1))
            dirs[package or ROOT_PACKAGE] = REPO / folder
    return dirs


def _py_files(*folders: str) -> list[Path]:
    files = []
    for folder in folders:
        base = REPO / folder
        if base.is_dir():
            files += [p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def _module_name(path: Path) -> str | None:
    """The dotted name a package file is installed under (None: not part of the package)."""
    best = None
    for package, folder in _package_dirs().items():
        try:
            rel = path.relative_to(folder)
        except ValueError:
            continue
        if best is None or len(folder.parts) > len(best[1].parts):
            best = (package, folder, rel)
    if best is None:
        return None
    package, _, rel = best
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ------------------------------------------------------------------------------- a. import layers
def _wheel_shaped_view(tmp_path: Path) -> Path:
    """A folder holding ``flexolmo_plugin`` laid out as the wheel installs it.

    The editable install maps ``conversion/`` and ``recipes/`` into the namespace with a meta-path
    finder, which import-linter's graph builder (grimp) does not see: it walks the folder of
    ``flexolmo_plugin`` only, where those subpackages do not exist. So the linter runs on a view of
    symbolic links (grimp follows them), built from setup.cfg's ``package_dir``.
    """
    view = tmp_path / "view"
    dirs = _package_dirs()
    for package, folder in sorted(dirs.items(), key=lambda item: item[0].count(".")):
        target = view.joinpath(*package.split("."))
        if package == ROOT_PACKAGE:
            target.mkdir(parents=True)
            for child in folder.iterdir():
                if child.name != "__pycache__":
                    _link(child, target / child.name)
        else:
            _link(folder, target)
    return view


def _link(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source, target_is_directory=source.is_dir())
    except OSError:  # no symlinks here: copy
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def _lint_imports_command() -> list[str]:
    script = Path(sys.executable).parent / "lint-imports"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", ("import sys; from importlinter.cli import lint_imports_command; "
                                   "sys.exit(lint_imports_command())")]


def test_import_layers_contract(tmp_path):
    pytest.importorskip("importlinter")
    view = _wheel_shaped_view(tmp_path)
    # import-linter puts its working directory first on sys.path: run it in the view so that it
    # finds the wheel-shaped package there, not the repository folder flexolmo_plugin/.
    result = subprocess.run([*_lint_imports_command(), "--no-cache", str(REPO / "setup.cfg")],
                            check=False, cwd=view, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{output}"
    # The graph covered every module of the package, conversion/ and recipes/ included.
    n_files = len(_py_files(*PACKAGE_FOLDERS))
    match = re.search(r"Analyzed (\d+) files", output)
    assert match and int(match.group(1)) == n_files, (
        f"import-linter analysed {match and match.group(1)} files, the package has {n_files}:\n{output}")


# ------------------------------------------------------------------------- b. tensor-name literals
GENERIC_COMPONENTS = frozenset({
    "weight", "decoder", "layers", "model", "mlp", "experts", "router", "self_attention", "self_attn",
    "embedding", "local_experts", "layer", "norm", "",
})
RULE_NAME_FIELDS = ("megatron", "hf", "hf_fused", "dense", "param", "checkpoint", "package")


def _tensor_name_tokens() -> frozenset[str]:
    """Every non-generic component of every tensor-name template of ``mapping.RULES`` (a component
    that is also a ``FlexOlmoConfig`` field, like ``router_bias``, names a config concept, not a tensor)."""
    import dataclasses

    from flexolmo_plugin.conversion import mapping
    from flexolmo_plugin.model.config import FlexOlmoConfig

    config_fields = {field.name for field in dataclasses.fields(FlexOlmoConfig)}
    tokens = set()
    for rule in mapping.RULES:
        for field in RULE_NAME_FIELDS:
            value = getattr(rule, field)
            templates = value if isinstance(value, tuple) else (value,)
            for template in templates:
                if not template:
                    continue
                for component in template.split("."):
                    component = re.sub(r"\{[^{}]*\}", "", component)
                    component = re.sub(r"_[wv]$", "", component)
                    if component not in GENERIC_COMPONENTS and component not in config_fields:
                        tokens.add(component)
    return frozenset(tokens)


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                ids.add(id(body[0].value))
    return ids


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant, f-string parts included, docstrings excluded."""
    tree = _parse(path)
    docstrings = _docstring_nodes(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _tensor_name_literals(path: Path, tokens: frozenset[str]) -> list[str]:
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, sorted(tokens))) + r")(\.|$)")
    return [f"{_rel(path)}:{line}: {text!r}" for line, text in sorted(_string_literals(path))
            if pattern.search(text)]


def test_no_tensor_name_literal_outside_the_table():
    tokens = _tensor_name_tokens()
    assert {"linear_fc1", "q_proj", "lm_head"} <= tokens, sorted(tokens)
    # Positive control: the detector finds the names in the table itself.
    assert _tensor_name_literals(MAPPING_FILE, tokens), "the detector flags nothing in conversion/mapping.py"
    violations = [v for path in _py_files(*PACKAGE_FOLDERS) if path != MAPPING_FILE
                  for v in _tensor_name_literals(path, tokens)]
    assert not violations, ("tensor names spelled outside conversion/mapping.py (add a rule or a helper "
                            "there instead):\n" + "\n".join(violations))


# ------------------------------------------------------------------------------------- c. wheel
# Not part of a source distribution: the build runs on a copy without them.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                     ".whl", ".gl", "flexolmo-demo*")


def test_wheel_installs_one_top_level_package(tmp_path):
    # setuptools builds in the source tree (build/, *.egg-info): build a copy, so that the test
    # leaves nothing in the checkout and cannot race another build there.
    source, out = tmp_path / "src", tmp_path / "wheel"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
    top = {name.split("/", 1)[0] for name in names}
    top = {name for name in top if not name.endswith(".dist-info")}
    assert top == {ROOT_PACKAGE}, sorted(top)
    for required in ("flexolmo_plugin/conversion/mapping.py", "flexolmo_plugin/recipes/train.py"):
        assert required in names, f"{required} missing from {wheels[0].name}"


# ------------------------------------------------------------------- d. importing patches nothing
_PATCH_PROBE = textwrap.dedent("""
    import json, pkgutil, importlib
    import torch, torch.overrides

    def watched():
        return {
            "torch.cuda.current_device": torch.cuda.current_device,
            "torch.cuda.Stream": torch.cuda.Stream,
            "torch.cuda.Event": torch.cuda.Event,
            "torch.cuda.synchronize": torch.cuda.synchronize,
            "torch.cuda.current_stream": torch.cuda.current_stream,
            "torch.cuda.get_rng_state": torch.cuda.get_rng_state,
            "torch.Tensor.cuda": torch.Tensor.cuda,
        }

    before = watched()
    import flexolmo_plugin.model
    modules = [info.name for info in pkgutil.walk_packages(flexolmo_plugin.model.__path__,
                                                           "flexolmo_plugin.model.")]
    modules += ["flexolmo_plugin.conversion.mapping", "flexolmo_plugin.lifecycle.freezing"]
    for name in modules:
        importlib.import_module(name)
    from flexolmo_plugin.model.config import FlexOlmoConfig
    FlexOlmoConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, num_experts=4, top_k=2)
    after = watched()
    print(json.dumps({
        "modules": modules,
        "patched": sorted(name for name in before if after[name] is not before[name]),
        "function_modes": [type(mode).__name__ for mode in torch.overrides._get_current_function_mode_stack()],
    }))
""")


def test_importing_the_model_patches_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA there is nothing to shim; the probe is for CPU machines")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _PATCH_PROBE], cwd=REPO.parent, env=env,
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "flexolmo_plugin.model.config" in report["modules"], report["modules"]
    assert not report["patched"], f"importing the model replaced {report['patched']}"
    assert not report["function_modes"], f"importing the model pushed TorchFunctionModes {report['function_modes']}"


# --------------------------------------------------------- e. no bare conversion / recipes imports
def _bare_folder_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            names = [node.args[0].value]  # __import__("x") / importlib.import_module("x")
        else:
            continue
        found += [f"{_rel(path)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in ("conversion", "recipes")]
    return found


def test_no_bare_top_level_conversion_or_recipes_imports():
    violations = [v for path in _py_files(*ALL_CODE_FOLDERS) for v in _bare_folder_imports(path)]
    assert not violations, ("import these as flexolmo_plugin.conversion / flexolmo_plugin.recipes:\n"
                            + "\n".join(violations))
    for folder in ("conversion", "recipes"):  # pytest may name a test package so; never the product folder
        module = sys.modules.get(folder)
        origin = Path(getattr(module, "__file__", None) or "/").resolve()
        assert module is None or REPO / folder not in origin.parents, f"{folder} imported from {origin}"
    # `python -m pytest` itself puts its working directory (the repository root) first on sys.path
    # (`python -P -m pytest` does not); beyond that entry, nothing -- not pytest (import-mode
    # importlib), not a .pth of the install -- may make the repository folders importable.
    path = list(sys.path)
    if path and not sys.flags.safe_path and Path(path[0] or os.getcwd()).resolve() == REPO:
        path = path[1:]
    assert all(Path(entry or os.getcwd()).resolve() != REPO for entry in path), sys.path
    for folder in ("conversion", "recipes"):
        assert importlib.machinery.PathFinder.find_spec(folder, path) is None, f"{folder} importable: {sys.path}"
        if path == sys.path:
            assert importlib.util.find_spec(folder) is None


# ----------------------------------------------------------------------- f. deferred imports
# Optional dependencies (module prefixes) that may be imported inside a function.
OPTIONAL = ("megatron.bridge", "transformer_engine", "megatron.core.extensions.transformer_engine",
            "megatron.core.extensions.transformer_engine_spec_provider", "matplotlib",
            "nemo_run", "sentence_transformers", "tokenizers", "omegaconf")
# The CLI defers each command's module so that `flexolmo --help` does not import torch; the compat
# module imports the Megatron internals it patches only when it patches them (never on a GPU machine).
DEFERRING_MODULES = ("flexolmo_plugin.cli", "flexolmo_plugin.compat")
# The recipes import Megatron-Bridge at module level, which needs the compat shims applied first.
DEFERRED_PACKAGES = ("flexolmo_plugin.recipes",)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module if is_package else module.rpartition(".")[0]
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if node.module:
        return [base]
    return [f"{base}.{alias.name}" for alias in node.names]  # from . import x: x may be a module


def _deferred_imports(path: Path) -> list[str]:
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in _imported_modules(node, module, is_package):
                if not (_under(name, OPTIONAL) or _under(name, DEFERRED_PACKAGES)
                        or _under(module, DEFERRING_MODULES)):
                    found.append(f"{_rel(path)}:{node.lineno}: {name}")
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(_parse(path), False)
    return found


def _deferred_import_violations() -> list[str]:
    return [v for path in _py_files(*PACKAGE_FOLDERS) for v in _deferred_imports(path)]


def test_deferred_imports_only_for_optional_dependencies():
    violations = _deferred_import_violations()
    assert not violations, ("imports inside functions of non-optional modules (import them at module "
                            "level):\n" + "\n".join(violations))


# ----------------------------------------------------------------------- g. lint
def test_ruff_is_clean():
    """``ruff check`` (rules in pyproject.toml) reports nothing anywhere in the repository."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
