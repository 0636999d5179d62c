"""The package's layers (../shared/STYLE.md, docs/ARCHITECTURE.md): lower layers never import higher ones, and no
module imports itself back through others. Every import counts, function-local ones included."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tracetune"
GROUND = {
    "config",
    "errors",
    "dist",
    "layout",
    "hashing",
    "logs",
    "faults",
    "allocator",
    "chat",
    "tracking",
    "__init__",
}
ALLOWED = {  # layer -> the layers it may import (besides itself and the ground floor)
    "face": {"rl", "evidence", "train", "eval", "models", "data"},
    "rl": {"train", "eval", "models", "data"},
    "evidence": {"eval", "models", "data"},
    "train": {"models", "data"},
    "eval": {"models", "data"},
    "models": set(),
    "data": set(),
    "ground": set(),
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _layer(module: str) -> str:
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] in ("cli", "pipeline", "lifecycle", "export_stage", "tune", "__main__"):
        return "face"
    if parts[0] in GROUND:
        return "ground"
    return parts[0]


def _imports(path: Path) -> set[str]:
    """tracetune modules `path` imports (a package import is its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tracetune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracetune"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
                found.add(candidate if is_module else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_runs_up_a_layer():
    wrong = []
    for module, imported in _graph().items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if theirs not in ({mine, "ground"} | ALLOWED[mine]):
                wrong.append(f"{module} ({mine}) imports {other} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {m: {i for i in imported if i in _graph_modules()} for m, imported in _graph().items()}
    cycles = []

    def visit(module, path):
        for other in graph.get(module, ()):
            if other == path[0]:
                cycles.append(" -> ".join([*path, other]))
            elif other not in path and len(path) < 8:
                visit(other, [*path, other])

    for module in graph:
        visit(module, [module])
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def _graph_modules() -> set[str]:
    return {_module(p) for p in PACKAGE.rglob("*.py")}


def test_report_and_compare_do_not_import_torch():
    code = (
        "import sys\n"
        "import tracetune.cli, tracetune.evidence.report, tracetune.evidence.compare\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scoring_and_verifys_rescoring_run_with_torch_blocked(tiny_run_dir):
    """eval/scoring.py and what `verify` rescores import neither torch nor transformers: with both made
    unimportable, every prediction of a finished run is rescored and its scores and comparisons recomputed."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import tracetune.eval.scoring\n"
        "from pathlib import Path\n"
        "from tracetune.evidence.manifest import recheck_scores\n"
        "from tracetune.layout import RunLayout\n"
        f"run = Path({str(tiny_run_dir)!r})\n"
        "print(recheck_scores(run), len(RunLayout(run).evaluations()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    problems, evaluations = result.stdout.split()
    assert problems == "[]" and int(evaluations) >= 4  # the baselines and the final evaluation, rescored
