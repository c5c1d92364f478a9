"""The shape of the code, checked: stage commands on top of a library grouped by concern; no
stage imports another stage, the library imports no stage; only the device seam touches
torch.cuda; only the task seam compares task kinds; the offline inference path imports no
training, tuning, plotting or optuna."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.core import tasks

ROOT = Path(pipeline.__file__).parent
STAGES = {m.name for m in pkgutil.iter_modules(pipeline.__path__) if not m.ispkg}
SUBPACKAGES = {m.name for m in pkgutil.iter_modules(pipeline.__path__) if m.ispkg}


def modules() -> dict[str, ast.Module]:
    """{dotted name: parsed source} of every module of the pipeline package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("pipeline", *path.relative_to(ROOT).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module) -> set[str]:
    """Every pipeline module a module imports (`from pipeline import x` counts as pipeline.x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("pipeline")}


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in STAGES else None


def test_the_tree_is_commands_on_top_of_a_library_grouped_by_concern():
    assert {"folds", "train", "predict", "ensemble", "submit", "package", "infer", "tune",
            "leaderboard", "prune", "demo", "preview", "imagenet", "auto"} <= STAGES
    assert {"core", "data", "runtime", "models", "training", "blending", "tuning", "reports",
            "packaging", "datasets", "bench", "planning"} == SUBPACKAGES


def test_no_stage_imports_another_stage_and_the_library_imports_no_stage():
    offenders = []
    for name, tree in modules().items():
        own = stage_of(name)
        for target in imported(tree):
            other = stage_of(target)
            if other is not None and other != own:
                offenders.append(f"{name} imports pipeline.{other}")
    assert offenders == []


def test_only_the_device_seam_touches_torch_cuda():
    touching = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "cuda" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                touching.append(name)
    assert set(touching) == {"pipeline.runtime.device"}


def test_only_the_task_seam_compares_task_kinds():
    compared = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                consts = [s.value for s in sides if isinstance(s, ast.Constant)]
                consts += [e.value for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set))
                           for e in s.elts if isinstance(e, ast.Constant)]
                attrs = [s.attr for s in sides if isinstance(s, ast.Attribute)]
                if set(consts) & set(tasks.KINDS) or "kind" in attrs and "task" in ast.unparse(node):
                    compared.append(f"{name}:{node.lineno}")
    assert all(c.startswith("pipeline.core.tasks:") for c in compared), compared


@pytest.mark.parametrize("command", ["pipeline.infer"])
def test_the_offline_inference_path_imports_only_what_it_needs(command):
    code = (f"import sys, {command}; print(' '.join(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in ('matplotlib', 'optuna', 'sqlalchemy') or "
            f"m.startswith(('pipeline.training', 'pipeline.tuning', 'pipeline.reports', "
            f"'pipeline.blending.search', 'pipeline.blending.run')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
