"""The package's layers: imports point only down, and no module imports itself back through others.

The order, bottom up (docs/architecture.md): the public math (``_checks``, ``schedules``, ``predictions``,
``reference``, ``conditions``, ``labels``) -> ``ops`` -> ``loss``, ``guidance``, ``generator``, ``samplers``
-> ``utils`` -> ``models`` -> ``engine`` -> ``training`` -> ``plan``, ``evaluate`` -> ``cli``, ``demo``.
"""
import ast
from pathlib import Path

import sidfast

ROOT = Path(sidfast.__file__).parent
BOTTOM = {"_checks", "schedules", "predictions", "reference", "conditions", "labels", "noise_levels", "_buildinfo",
          "_moved",
          "_C"}
LAYERS = [BOTTOM, {"ops"}, {"loss", "guidance", "generator", "samplers", "__init__"}, {"utils"}, {"models"}, {"engine"},
          {"training"}, {"plan", "evaluate"}, {"cli", "demo"}]


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"module sidfast.{module} belongs to no layer: add it to tests/test_layers.py")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            yield ".".join(parts), path


def _module_or_root(name: str) -> str:
    """``from sidfast import name``: the module ``name``, or a name of the package's root (``__init__``)."""
    if (ROOT / f"{name}.py").exists() or (ROOT / name).is_dir() or any(ROOT.glob(f"{name}.*.so")):
        return name
    return "__init__"


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sidfast":
            base = node.module[len("sidfast"):].lstrip(".")
            out += [(node.lineno, base)] if base else [(node.lineno, _module_or_root(a.name)) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("sidfast."):]) for a in node.names if a.name.startswith("sidfast.")]
    return out


def test_imports_point_only_down():
    wrong = []
    for module, path in _modules():
        if module == "_moved":  # the old flat names, resolved lazily to the modules of every layer
            continue
        for line, target in _imports(path, top_level_only=False):
            if _layer(target) > _layer(module):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: sidfast.{module} imports sidfast.{target}")
            if module.split(".")[0] in ("plan", "evaluate") and target.split(".")[0] in ("plan", "evaluate") \
                    and module.split(".")[0] != target.split(".")[0]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: plan and evaluate are siblings")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {}
    modules = dict(_modules())
    for module, path in modules.items():
        targets = set()
        for _, target in _imports(path, top_level_only=True):
            # "from sidfast.x import y": y may be a module of package x
            targets.add(target if target in modules else target.rsplit(".", 1)[0] if "." in target else target)
        graph[module] = {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
