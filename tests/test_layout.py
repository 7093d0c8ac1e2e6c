"""The package's layers: imports only point down (or within a package), and never in a circle.

    cli                      the command line
    experiments, tools       the paper's experiments; bench, export, explore, figures
    training                 config, checkpoints, tasks, the one Trainer, evaluation
    data                     IDX files, sources, splits, batches, generated data sets
    nn                       layers, losses, the CapsNet, the baseline CNN
    utils                    helpers that import nothing above them
    errors                   the one exception type
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import capsnet

ROOT = Path(capsnet.__file__).parent
LAYERS = {"errors": 0, "utils": 1, "nn": 2, "data": 3, "training": 4, "experiments": 5,
          "tools": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = ["capsnet", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """capsnet modules imported anywhere in the file (inside functions too)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {name for name in found if name in modules and name != module}


def layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else ""
    return top, LAYERS.get(top, 99)


def test_every_module_belongs_to_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        module = module_name(path)
        assert module == "capsnet" or layer(module)[0] in LAYERS, module


def test_imports_point_down_or_stay_in_their_package() -> None:
    upward = []
    for path in ROOT.rglob("*.py"):
        module = module_name(path)
        if module == "capsnet":
            continue  # the public API gathers from every layer
        top, rank = layer(module)
        for target in imports(path):
            target_top, target_rank = layer(target)
            if target == "capsnet" or (target_top != top and target_rank >= rank):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycles() -> None:
    graph = {module_name(p): {t for t in imports(p) if t != "capsnet"} for p in ROOT.rglob("*.py")}
    # A package's __init__ importing its own modules is not a cycle with them.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_command_line_starts_without_the_libraries_only_some_commands_use() -> None:
    """scipy (photo preparation, .mat files) and the explore page load when a command needs
    them, not in every command's start-up."""
    lazy = ["scipy", "capsnet.utils.digits", "capsnet.tools.explore", "http.server"]
    probe = f"import sys, capsnet.cli; print([m for m in {lazy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_package_shows_its_public_names_and_each_one_loads() -> None:
    """dir(capsnet) lists the public names (what tab completion offers), not the helpers of
    its lazy imports, and every public name resolves to its object."""
    shown = {name for name in dir(capsnet) if not name.startswith("__")}
    assert shown == set(capsnet.__all__)
    for name in capsnet.__all__:
        value = getattr(capsnet, name)
        assert (name == "MODELS" and isinstance(value, dict)) or value.__name__ == name, name
    assert isinstance(capsnet.__version__, str)
