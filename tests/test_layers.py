"""The architecture of uta_cli as a contract. The package is a house of wings (subpackages by
concern) over a ground floor of small shared modules. Every import of a uta_cli module, at module
level or inside a function, points to its own wing or a wing below, and the import graph has no
cycle.

Wings, top first (a module is in the first wing with a matching prefix):

    app        the Typer app and its commands
    workflows  one user-facing job each: pretrain, finetune, zeroshot, export, convert, ...
    tasks      what differs between trainers (alignment, classification, contrastive)
    train      the one engine, its setup, the resume guard, trackers
    evaluate   zero-shot, evaluation datasets, per-process loops, reports, linear probe, inference
    export     export formats, their verification, the hub layout
    loading    any checkpoint or init as one typed model
    data       sources, datasets, tar shards, transforms
    models     student, teacher, released and open_clip formats
    masks      mask generation and its report
    ground     recipe, losses, checkpoint files, outputs, io, progress, errors

Within a wing imports may run sideways (models/release.py uses models/student.py), except between
workflows: each workflow stands on the wings below, so what two workflows share moves down.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import uta_cli

GROUND = ("uta_cli.recipe", "uta_cli.losses", "uta_cli.checkpoint", "uta_cli.outputs",
          "uta_cli.io", "uta_cli.progress", "uta_cli.errors", "uta_cli")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("app", ("uta_cli.app", "uta_cli.__main__", "uta_cli.commands")),
    ("workflows", ("uta_cli.workflows",)),
    ("tasks", ("uta_cli.tasks",)),
    ("train", ("uta_cli.train",)),
    ("evaluate", ("uta_cli.evaluate",)),
    ("export", ("uta_cli.export",)),
    ("loading", ("uta_cli.loading",)),
    ("data", ("uta_cli.data",)),
    ("models", ("uta_cli.models",)),
    ("masks", ("uta_cli.masks",)),
    ("ground", GROUND),
]
WINGS = [name for name, _ in LAYERS if name not in ("app", "ground")]


def module_names(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = package_dir.name
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (root, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, wherever the import statement sits."""
    root = package_dir.name
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets
                       if (t == root or t.startswith(root + ".")) and t != name}
        # `import pkg.a.b` names a module; keep only what exists (an attribute path stops short)
        graph[name] = {_existing(t, modules) for t in graph[name]} - {name}
    return graph


def _existing(target: str, modules: dict) -> str:
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def layer_of(module: str, layers) -> int:
    """Index in `layers` (0 = top) of the first layer with a prefix matching `module`."""
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if module == p or module.startswith(p + ".") and p.count(".") > 0:
                return i
    raise KeyError(module)


def upward_imports(graph: dict[str, set[str]], layers) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) < layer_of(module, layers):
                found.append(f"{module} ({layers[layer_of(module, layers)][0]}) imports "
                             f"{target} ({layers[layer_of(target, layers)][0]})")
    return found


def sibling_imports(graph: dict[str, set[str]], layers, layer: str) -> list[str]:
    """Imports between two modules of `layer` (workflows must not import each other)."""
    index = [i for i, (name, _) in enumerate(layers) if name == layer][0]
    return [f"{m} imports {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
            if layer_of(m, layers) == index == layer_of(t, layers)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


UTA_CLI = pathlib.Path(uta_cli.__file__).parent


def test_every_module_has_a_layer():
    unplaced = []
    for m in module_names(UTA_CLI):
        try:
            layer_of(m, LAYERS)
        except KeyError:
            unplaced.append(m)
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_imports_run_downward():
    graph = import_graph(UTA_CLI)
    assert sum(len(t) for t in graph.values()) > 100  # the walk sees the real imports
    assert not upward_imports(graph, LAYERS)


# Modules that may import uta_cli modules inside functions, because it keeps the command line
# quick: the commands import their workflow only when they run (`uta --help` needs no torch), and
# dryrun imports torch-backed modules only when a recipe is checked (`uta recipes` lists at once).
LAZY_IMPORTERS = ("uta_cli.app", "uta_cli.commands", "uta_cli.workflows.dryrun")


def function_level_imports(package_dir: pathlib.Path) -> list[str]:
    """'module: imported' for each import of a package module inside a function."""
    root = package_dir.name
    found = []
    for name, path in module_names(package_dir).items():
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "")
                                                         .split(".")[0] == root):
                    found.append(f"{name}: {'.' * node.level}{node.module or ''}")
                elif isinstance(node, ast.Import):
                    found += [f"{name}: {a.name}" for a in node.names
                              if a.name.split(".")[0] == root]
    return sorted(set(found))


def test_imports_inside_functions_only_where_they_keep_the_command_line_quick():
    lazy = function_level_imports(UTA_CLI)
    assert any(m.startswith("uta_cli.commands.") for m in lazy)  # the walk sees them
    assert [m for m in lazy if not m.startswith(LAZY_IMPORTERS)] == []


def test_the_command_line_answers_without_importing_torch():
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from uta_cli.app import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            "import uta_cli.workflows.dryrun\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workflows_do_not_import_each_other():
    assert sibling_imports(import_graph(UTA_CLI), LAYERS, "workflows") == []


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph(UTA_CLI)) is None


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


TINY_LAYERS = [("app", ("pkg.app",)), ("work", ("pkg.work",)),
               ("ground", ("pkg.models", "pkg"))]


@pytest.fixture
def tiny(tmp_path):
    return _write(tmp_path / "pkg", {
        "__init__.py": "",
        "app.py": "from pkg import work\n",
        "work.py": "from pkg.models.student import Student\n",
        "models/__init__.py": "",
        "models/student.py": "from .teacher import Teacher\n\nclass Student: pass\n",
        "models/teacher.py": "class Teacher: pass\n",
    })


def test_checker_passes_a_downward_package(tiny):
    graph = import_graph(tiny)
    assert graph["pkg.app"] == {"pkg.work"}
    assert graph["pkg.models.student"] == {"pkg.models.teacher"}  # relative imports resolved
    assert upward_imports(graph, TINY_LAYERS) == []
    assert find_cycle(graph) is None


def test_checker_fails_on_an_upward_import_inside_a_function(tiny):
    (tiny / "models" / "teacher.py").write_text(
        "class Teacher:\n    def run(self):\n        from pkg.work import go\n        return go\n")
    graph = import_graph(tiny)
    assert upward_imports(graph, TINY_LAYERS) == [
        "pkg.models.teacher (ground) imports pkg.work (work)"]
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.models.student", "pkg.models.teacher", "pkg.work"}


def test_checker_fails_on_a_cycle_within_one_layer(tiny):
    (tiny / "models" / "teacher.py").write_text("import pkg.models.student\n")
    graph = import_graph(tiny)
    assert upward_imports(graph, TINY_LAYERS) == []
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.models.student", "pkg.models.teacher"}


def test_checker_fails_on_one_workflow_importing_another(tiny):
    layers = [("app", ("pkg.app",)), ("work", ("pkg.work", "pkg.other")),
              ("ground", ("pkg.models", "pkg"))]
    assert sibling_imports(import_graph(tiny), layers, "work") == []
    (tiny / "other.py").write_text("def go():\n    from pkg import work\n    return work\n")
    graph = import_graph(tiny)
    assert upward_imports(graph, layers) == []  # sideways, not upward
    assert sibling_imports(graph, layers, "work") == ["pkg.other imports pkg.work"]


def test_checker_fails_on_an_upward_import_between_wings(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "data/__init__.py": '"""Data."""\n',
        "data/pipeline.py": "from pkg.masks.generate import draw\n",
        "masks/__init__.py": '"""Masks."""\n',
        "masks/generate.py": "def draw():\n    return 1\n",
    })
    layers = [("data", ("pkg.data",)), ("masks", ("pkg.masks",)), ("ground", ("pkg",))]
    assert upward_imports(import_graph(pkg), layers) == []
    (pkg / "masks" / "generate.py").write_text("from pkg.data import pipeline\n")
    assert upward_imports(import_graph(pkg), layers) == [
        "pkg.masks.generate (masks) imports pkg.data.pipeline (data)"]


def _wing_modules(wing: str) -> list[str]:
    return [m for m in module_names(UTA_CLI) if LAYERS[layer_of(m, LAYERS)][0] == wing]


def test_each_wing_is_a_package_whose_init_is_a_docstring_only():
    for wing in WINGS:
        init = UTA_CLI / wing / "__init__.py"
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(
            body[0].value, ast.Constant) and isinstance(body[0].value.value, str), init
        assert "May import" in body[0].value.value, f"{init}: say which wings it may import"


def test_the_top_level_holds_the_app_and_a_small_ground_floor():
    top = sorted(p.stem for p in UTA_CLI.glob("*.py"))
    ground = [m for m in top if m not in ("__init__", "__main__", "app")]
    assert len(ground) <= 8, ground
    assert sorted(f"uta_cli.{m}" for m in ground) == sorted(g for g in GROUND if g != "uta_cli")
    assert not [m for m in top if m.startswith(("eval_", "export_", "finetune_", "tar_", "mask_"))]


def test_names_do_not_repeat_their_wing():
    prefixes = {"evaluate": "eval", "export": "export", "masks": "mask", "data": "data",
                "train": "train", "loading": "load"}
    repeated = [m for wing, prefix in prefixes.items() for m in _wing_modules(wing)
                if m.rpartition(".")[2].startswith(prefix + "_")]
    assert repeated == []


def test_no_module_over_500_lines():
    long = {name: n for name, path in module_names(UTA_CLI).items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


def test_the_layers_page_gives_each_wing_a_paragraph_naming_its_modules():
    """docs/layers.md has a section per wing, in order, naming each module of the wing."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "layers.md").read_text(encoding="utf-8")
    sections = text.split("\n## ")[1:]
    assert [s.split()[0] for s in sections] == [name for name, _ in LAYERS]
    missing = []
    for (wing, _), section in zip(LAYERS, sections):
        named = set(re.findall(r"`([\w.]+)`", section))
        for module in _wing_modules(wing):
            if module == f"uta_cli.{wing}":
                continue  # the section's heading names the wing
            short = module.removeprefix("uta_cli.")
            if module.startswith("uta_cli.commands."):
                short = "commands"  # the commands are named as one package
            if not ({short, module, short.removeprefix(wing + ".")} & named):
                missing.append(f"{module}: not in the {wing} section")
    assert not missing, missing
