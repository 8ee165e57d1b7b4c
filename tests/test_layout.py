"""The layout readers and copiers rely on: train.py reads as the phases, the core imports no support code, no module
imports another that imports it back, and every module opens with what it implements, how to run it, its deviations.

Run: python -m pytest tests/test_layout.py -q   (a few seconds; one subprocess imports train)
"""
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import train

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted([*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py")])


def test_train_py_reads_top_down_as_the_phases():
    order = [train.Config, train.rollout_and_submit, train.judge_outcome, train.advantages, train.backward_rpo_loss,
             train.reduce_and_step, train.train_step, train.evaluate, train.prepare, train.loop, train.main]
    starts = [inspect.getsourcelines(obj)[1] for obj in order]
    assert starts == sorted(starts)
    source, _ = inspect.getsourcelines(train.train_step)
    assert len(source) <= 30
    body = ast.parse("".join(source)).body[0]

    def depth(node, level=0):
        nested = (ast.For, ast.While, ast.If, ast.With, ast.Try)
        return max([level] + [depth(child, level + isinstance(child, nested)) for child in ast.iter_child_nodes(node)])
    assert depth(body) <= 3
    phases = [line.split("# ")[-1].split(".")[0] for line in source if "# " in line and ". " in line.split("# ")[-1]]
    assert phases == ["1", "2", "3", "4", "5"], phases  # the phase comments, in order, once each


def test_importing_the_trainer_loads_no_support_code():
    code = "import sys, train; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tools', 'bench')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def imports_of(path):
    """The project modules `path` imports anywhere in it (top level or inside functions)."""
    names = {p.stem for p in MODULES if p.stem != "__init__"} | {"tools"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[-1] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module.split(".")[-1]} | ({a.name for a in node.names} if node.module == "tools" else set())
    return found & names - {path.stem}


def test_no_two_modules_import_each_other():
    graph = {p.stem: imports_of(p) for p in MODULES}
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})
    assert cycles == []


def test_the_core_never_imports_support_code_at_its_top():
    for path in ROOT.glob("*.py"):
        top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n.split(".")[0] in ("tools", "bench")}, path.name


def test_every_module_says_what_it_implements_how_to_run_it_and_its_deviations():
    for path in MODULES:
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "arXiv" in doc and "Run" in doc and "eviation" in doc, path.name
