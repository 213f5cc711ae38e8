"""The house's shape, read from the source: imports point one way, one path makes masks, one list
of names, small modules. Each test names the file and line that breaks its rule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from prunerzero.cli import main
from prunerzero.config import config_from_dict
from prunerzero.errors import UserError
from prunerzero.evaluation.heldout import known_cell

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prunerzero"
MAX_LINES = 450

# Which packages of prunerzero may import which: a package never imports one above it.
BELOW = {
    "primitives": set(),
    "pruning": {"primitives"},
    "fitness": {"primitives", "pruning"},
    "evaluation": {"primitives", "pruning", "fitness"},
    "search": {"primitives", "fitness"},
}


def sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def imports(path: Path) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, module, names, at module level) of every ``prunerzero`` import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in tree.body:  # imports for type hints only run no code
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            top |= {id(n) for n in node.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunerzero"):
            out.append((node, node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("prunerzero"):
                    out.append((node, a.name, [], id(node) in top))
    return out


def package_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def test_packages_import_only_the_packages_below_them():
    wrong = []
    for path in sources(PACKAGE):
        mine = package_of(path)
        if mine not in BELOW:
            continue
        for node, module, names, _ in imports(path):
            parts = module.split(".")
            targets = [parts[1]] if len(parts) > 1 else names  # "from prunerzero import runfolder"
            for target in targets:
                if target in BELOW and target != mine and target not in BELOW[mine]:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} ({mine}) imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_private_names_imported_across_modules_and_no_local_prunerzero_imports():
    wrong = []
    for path in sources(PACKAGE, ROOT / "benchmarks", ROOT / "tests"):
        for node, module, names, at_top in imports(path):
            private = [n for n in names if n.startswith("_")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports private {', '.join(private)} from {module}")
            if not at_top and path.parent.name != "tests":
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} inside a function")
    assert not wrong, "\n".join(wrong)


def test_one_function_turns_scores_into_masks():
    """prune_mask/prune_count (scores -> mask) are called from the one tree-to-mask module only."""
    allowed = {PACKAGE / "pruning" / "masks.py", PACKAGE / "pruning" / "layer_masks.py"}
    wrong = [f"{p.relative_to(ROOT)}:{i}" for p in sources(PACKAGE) if p not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bprune_(mask|count)\(", line)]
    assert not wrong, "masks made outside pruning/layer_masks.py: " + ", ".join(wrong)


def test_known_method_and_baseline_names_are_listed_once():
    """The tuples of method, baseline, allocation, update and held-out text names live in choices.py."""
    lists = [r'"magnitude", "wanda"', r'"wanda", "ria", "pruner-zero"', r'"uniform", "owl"', r'"once", "sequential"',
             r'"wikitext2:test", "c4:validation"', r'"none", "obs"', r'"block", "row"']
    wrong = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sources(PACKAGE) if p.name != "choices.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(re.search(s, line) for s in lists)]
    assert not wrong, "name lists outside prunerzero/choices.py:\n" + "\n".join(wrong)


def test_no_module_is_longer_than_a_sitting():
    long = {str(p.relative_to(ROOT)): n for p in sources(PACKAGE) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_a_misspelt_name_gets_the_nearest_one_from_commands_configs_and_cells(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prune", "--method", "wand", "--model", "x"])
    assert stop.value.code == 2
    assert "unknown 'wand'; did you mean 'wanda'?" in capsys.readouterr().err
    with pytest.raises(UserError, match="heldout.baselines: unknown 'sparsgpt'; did you mean 'sparsegpt'"):
        config_from_dict({"heldout": {"baselines": ["wanda", "sparsgpt"]}})
    with pytest.raises(UserError, match="fitness.stats_mode: unknown 'one'; did you mean 'once'"):
        config_from_dict({"fitness": {"stats_mode": "one"}})
    with pytest.raises(UserError, match="baseline: unknown 'pruner_zero'; did you mean 'pruner-zero'"):
        known_cell("pruner_zero")
