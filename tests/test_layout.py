"""The run directory has one owner, tracetune.layout: every file a finished run holds is named by it, and no
other module spells a run file's name."""

import ast
from pathlib import Path

from tracetune import layout

PACKAGE = Path(layout.__file__).parent
# The names only the layout may spell: every file name constant it defines.
RUN_FILE_NAMES = {
    value
    for name, value in vars(layout).items()
    if name.isupper() and isinstance(value, str) and "." in value and "/" not in value
} | {layout.FINAL_MODEL, layout.CHECKPOINTS}


def _spelled(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants (f-string parts included) used as paths that name a run file: no spaces, and one of
    their /-separated parts is a run file's name. Messages to a person (with spaces) may name a file."""
    found = []
    for node in ast.walk(tree):
        is_path = isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value
        if is_path and any(part in RUN_FILE_NAMES for part in node.value.split("/")):
            found.append((node.lineno, node.value))
    return found


def test_no_module_outside_the_layout_spells_a_run_file_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "layout.py":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            offenders += [f"{path.relative_to(PACKAGE)}:{line}: {value!r}" for line, value in _spelled(tree)]
    assert not offenders, "run file names spelled outside tracetune/layout.py:\n" + "\n".join(offenders)


def test_the_grep_catches_a_spelled_name():
    assert _spelled(ast.parse('x = run_dir / "training.json"\ny = f"{stage}/metrics.jsonl"'))
    assert not _spelled(ast.parse('raise E("no config.yaml in the run directory")'))


def test_every_file_of_a_finished_run_is_named_by_the_layout(tiny_run_dir):
    listed = [line.split("  ", 1)[1] for line in (tiny_run_dir / layout.MANIFEST).read_text().splitlines()]
    assert len(listed) > 20
    unnamed = [f for f in listed if layout.describe(f) is None]
    assert not unnamed, unnamed
    assert layout.describe("eval/keep/sft_format/predictions.jsonl") and layout.describe(
        "grpo/heldout/step-4/scores.json"
    )
    assert layout.describe("notes.txt") is None
    assert set(layout.expected_files(_config(tiny_run_dir))) <= set(listed) | {layout.MANIFEST}


def _config(run_dir):
    from tracetune.config import load_config

    return load_config(run_dir / layout.CONFIG)


def test_the_architecture_doc_shows_the_layout():
    text = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for pattern, _ in layout.FILES:
        assert f"`{pattern}`" in text, pattern
