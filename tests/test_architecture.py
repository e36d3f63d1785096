"""The import directions of docs/design.md §10, checked on the source: the core never imports
``integrations``, transformers, datasets or matplotlib at module level (bitsandbytes only
inside functions); policies never import torch or a module class; and ``requires_grad`` of
parameters is written in one module only."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "adaptopt"
FORBIDDEN_IN_CORE = ("transformers", "datasets", "matplotlib", "adaptopt.integrations", "integrations")
MODULE_CLASSES = ("LoRALinear", "QuantLoRALinear")


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every import in ``path`` (module level only, or all)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((base, [alias.name for alias in node.names], node.lineno))
        elif top_level_only and isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not imports
            continue
    return found


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _core_forbidden(module: str, names: list[str]) -> bool:
    root = module.lstrip(".").split(".")[0]
    return root in FORBIDDEN_IN_CORE or (module.startswith(".") and "integrations" in module.split("."))


def _bitsandbytes(module: str, names: list[str]) -> bool:
    return module.split(".")[0] == "bitsandbytes"


def _policy_forbidden(module: str, names: list[str]) -> bool:
    return (module.split(".")[0] == "torch" or any(n in MODULE_CLASSES for n in names)
            or module.startswith(".") and module.rsplit(".", 1)[-1] in ("lora", "quant"))


def _violations(files: list[Path], rule, top_level_only: bool = False) -> list[str]:
    return [f"{path.name}:{line}: {module} {names or ''}" for path in files
            for module, names, line in _imports(path, top_level_only) if rule(module, names)]


def test_the_core_never_imports_integrations_or_heavy_packages():
    assert not _violations(_core_files(), _core_forbidden)


def test_bitsandbytes_is_imported_only_inside_functions():
    assert not _violations(_core_files(), _bitsandbytes, top_level_only=True)


def test_policies_import_neither_torch_nor_module_classes():
    assert not _violations(sorted((CORE / "policies").glob("*.py")), _policy_forbidden)


def test_requires_grad_of_parameters_is_written_in_one_module():
    """``requires_grad_`` calls (and ``.requires_grad =`` assignments) live in transitions.py; the
    only other one marks an *activation* (a layer input) in the statistics hooks."""
    writers: dict[str, list[int]] = {}
    for path in _core_files():
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "requires_grad_"
            assign = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "requires_grad" for t in node.targets)
            if call or assign:
                writers.setdefault(path.name, []).append(node.lineno)
    assert set(writers) <= {"transitions.py", "layer_stats.py"}, writers
    assert len(writers.get("layer_stats.py", [])) <= 1


def test_the_checks_can_fail(tmp_path):
    """The same rules flag a file that breaks them (so a passing run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import transformers\nfrom ..lora import LoRALinear\nimport torch\n"
                   "def f():\n    import bitsandbytes\nimport bitsandbytes.nn\n")
    assert len(_violations([bad], _core_forbidden)) == 1
    assert len(_violations([bad], _policy_forbidden)) == 2
    assert len(_violations([bad], _bitsandbytes, top_level_only=True)) == 1
    assert len(_violations([bad], _bitsandbytes)) == 2
