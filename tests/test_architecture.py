"""The parts of the library and who may import whom (docs/architecture.md), checked on the source.

Every import counts, those inside function bodies included; only ``if TYPE_CHECKING:`` blocks
(annotations, never run) are left out. Rules:

- each part imports only the parts below it (:data:`MAY_IMPORT`); the top-level leaves
  (``modes``, ``name_patterns``, ``peft_arguments``, ``_imports``) import nothing of adaptopt;
- the module graph has no circle (a module reaching up through a function-level import is one);
- the library (everything but ``adaptopt.cli``) never imports transformers, datasets,
  matplotlib, yaml or the framework adapters, and bitsandbytes only inside functions;
- policies import neither torch nor a layer class;
- ``requires_grad`` of parameters is written in one module, ``layers/trainable_flags.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "adaptopt"
LEAVES = {"adaptopt.modes", "adaptopt.name_patterns", "adaptopt.peft_arguments", "adaptopt._imports"}
MAY_IMPORT = {
    "leaves": set(),
    "layers": {"leaves"},
    "scores": {"leaves"},
    "policies": {"leaves", "scores"},
    "surgery": {"leaves", "layers"},
    "training": {"leaves", "layers", "scores", "policies", "surgery"},
    "formats": {"leaves", "layers", "surgery"},
    "root": {"leaves", "layers", "scores", "policies", "surgery", "training", "formats"},
    "cli": {"leaves", "layers", "scores", "policies", "surgery", "training", "formats", "root", "integrations"},
    "integrations": {"root", "leaves", "layers", "surgery", "training", "formats", "policies"},
}
HEAVY = ("transformers", "datasets", "matplotlib", "yaml", "lightning", "peft", "trl")
LAYER_CLASSES = ("LoRALinear", "QuantLoRALinear")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "integrations":
        parts = ["adaptopt", "integrations", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    if module in LEAVES:
        return "leaves"
    parts = module.split(".")
    if module == "adaptopt":
        return "root"
    return parts[1] if parts[1] in MAY_IMPORT else "root"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                                         or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(source: str, module: str, is_package: bool) -> list[tuple[str, list[str], int, bool]]:
    """``(absolute module, names, line, inside a function)`` of every import in ``source`` but those
    under ``if TYPE_CHECKING:``; relative imports resolved against ``module``."""
    found: list[tuple[str, list[str], int, bool]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def sources() -> dict[str, tuple[str, bool, str]]:
    """``{module: (source, is_package, file)}`` for the library, the CLI and the framework adapters."""
    files = sorted(CORE.rglob("*.py")) + sorted((ROOT / "integrations").glob("*.py"))
    return {module_name(p): (p.read_text(), p.name == "__init__.py", str(p.relative_to(ROOT))) for p in files}


def internal_target(target: str, names: list[str], known: set[str]) -> str | None:
    """The adaptopt module an import refers to (``from .x import y``: ``x.y`` if that is a module)."""
    if not target.startswith("adaptopt"):
        return None
    for name in names:
        if f"{target}.{name}" in known:
            return f"{target}.{name}"
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def upward_imports(modules: dict[str, tuple[str, bool, str]]) -> list[str]:
    known = set(modules)
    bad = []
    for module, (source, is_package, file) in modules.items():
        mine = part_of(module)
        for target, names, line, _ in imports(source, module, is_package):
            dest = internal_target(target, names, known)
            if dest is None or part_of(dest) == mine:
                continue
            if part_of(dest) not in MAY_IMPORT[mine]:
                bad.append(f"{file}:{line}: {mine} imports {dest} ({part_of(dest)})")
    return bad


def cycles(modules: dict[str, tuple[str, bool, str]]) -> list[list[str]]:
    """Circles in the module graph (function-level imports included)."""
    known = set(modules)
    edges = {m: {d for t, names, _, _ in imports(src, m, pkg)
                 if (d := internal_target(t, names, known)) is not None and d != m}
             for m, (src, pkg, _) in modules.items()}
    for module in list(edges):  # a package's __init__ runs what it imports: a module inside it depends on it
        parent = module.rpartition(".")[0]
        if parent in edges and parent != "adaptopt":
            edges[module] = edges[module] - {parent}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def library_violations(modules: dict[str, tuple[str, bool, str]]) -> list[str]:
    """Heavy packages anywhere in the library; bitsandbytes at module level; torch or layer classes in policies."""
    bad = []
    for module, (source, is_package, file) in modules.items():
        if part_of(module) in ("cli", "integrations"):
            continue
        for target, names, line, in_function in imports(source, module, is_package):
            root = target.split(".")[0]
            if root in HEAVY or target.startswith("adaptopt.integrations") or target.startswith("adaptopt.cli"):
                bad.append(f"{file}:{line}: imports {target}")
            if root == "bitsandbytes" and not in_function:
                bad.append(f"{file}:{line}: imports bitsandbytes at module level")
            if part_of(module) == "policies" and (root == "torch" or any(n in LAYER_CLASSES for n in names)
                                                  or target.startswith("adaptopt.layers")):
                bad.append(f"{file}:{line}: a policy imports {target} {names}")
    return bad


def test_no_part_imports_a_part_above_it():
    assert not upward_imports(sources())


def test_the_module_graph_has_no_circle():
    assert not cycles(sources())


def test_the_library_imports_no_heavy_package_and_policies_no_torch():
    assert not library_violations(sources())


def test_at_most_about_a_dozen_modules_sit_directly_in_adaptopt():
    direct = sorted(p.name for p in CORE.glob("*.py"))
    assert len(direct) <= 12, direct


def test_requires_grad_of_parameters_is_written_in_one_module():
    """``requires_grad_`` calls (and ``.requires_grad =`` assignments) live in
    layers/trainable_flags.py; the only other one marks an *activation* (a layer input) in the
    statistics hooks."""
    writers: dict[str, list[int]] = {}
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "requires_grad_"
            assign = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "requires_grad" for t in node.targets)
            if call or assign:
                writers.setdefault(str(path.relative_to(CORE)), []).append(node.lineno)
    assert set(writers) <= {"layers/trainable_flags.py", "training/layer_stats.py"}, writers
    assert len(writers.get("training/layer_stats.py", [])) <= 1


@pytest.mark.parametrize("module, source, rule", [
    ("adaptopt.layers.bad", "def build():\n    from ..training.optimizer import AdaptiveOptimizer\n", upward_imports),
    ("adaptopt.layers.bad", "from adaptopt.formats import checkpoint\n", upward_imports),
    ("adaptopt.modes_bad", "x = 1\n", None),
    ("adaptopt.layers.bad", "def f():\n    import transformers\n", library_violations),
    ("adaptopt.layers.bad", "import bitsandbytes\n", library_violations),
    ("adaptopt.policies.bad", "from ..layers.lora import LoRALinear\n", library_violations),
])
def test_the_checks_fail_on_a_deliberately_bad_file(module, source, rule):
    """A bad module added to the real tree is caught (so a passing run means something)."""
    modules = sources()
    assert not upward_imports(modules) and not library_violations(modules)
    if rule is None:  # a harmless module is not flagged
        modules[module] = (source, False, "adaptopt/modes_bad.py")
        assert not upward_imports(modules) and not library_violations(modules)
        return
    modules[module] = (source, False, module.replace(".", "/") + ".py")
    assert rule(modules)


def test_a_circle_through_a_function_level_import_is_found():
    modules = sources()
    source, is_package, file = modules["adaptopt.layers.layout"]
    reaching_up = "\ndef build():\n    from .lora import LoRALinear\n"
    modules["adaptopt.layers.layout"] = (source + reaching_up, is_package, file)
    found = cycles(modules)
    assert any("adaptopt.layers.layout" in c and "adaptopt.layers.lora" in c for c in found), found
