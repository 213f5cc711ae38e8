"""Every name a user chooses from, listed once, and the rules that several settings share.

Commands, configs and held-out cells all check names here, so a misspelt name gets the same
answer everywhere: what was given, the nearest known name, and the whole list. (The formulas of the
known metrics live in :mod:`prunerzero.primitives.known`; these are the names that select them.)
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path

from prunerzero.errors import UserError

# ``prune --method``: the known metrics by name, SparseGPT (a tree inside the OBS update), or a tree.
METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "tree")
# Methods whose masks need the calibration pass (activations or the Hessian).
CALIBRATED_METHODS = ("wanda", "ria", "sparsegpt")
# What a held-out table compares a search's metrics with (and "dense", the unpruned model).
BASELINES = ("magnitude", "wanda", "ria", "sparsegpt", "pruner-zero")
BASELINE_NAMES = ("dense", *BASELINES)
# What a discovery is measured against on its own fitness text, Wanda first.
COMPARED = ("wanda", "ria", "pruner-zero")
SWEEP_BASELINES = ("magnitude", "wanda", "sparsegpt")  # the methods a report's sweep draws beside the trees
ALLOCATIONS = ("uniform", "owl")  # or an allocation file
STATS_MODES = ("once", "sequential")
UPDATES = ("none", "obs")
OBS_SCOPES = ("block", "row")
HELDOUT_TEXTS = ("wikitext2:test", "c4:validation")
# A search config's choices.
ALGORITHMS = ("generational", "steady_state")
EVALUATORS = ("inprocess", "ray", "reconstruction")
SPACES = ("metric", "allocation")


def choose(value: object, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``; otherwise a :class:`UserError` naming the nearest."""
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"{what}: unknown {value!r}; {hint}choose one of {', '.join(choices)}")


def one_of(choices: Sequence[str], what: str):
    """An argparse ``type`` that accepts one of ``choices`` and answers anything else as
    :func:`choose` does (argparse's own ``choices`` lists them but suggests nothing): one line from
    argparse, status 2."""

    def parse(value: str) -> str:
        try:
            return choose(value, choices, what)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{what}: ")) from None

    return parse


def choose_all(values: Sequence[object], choices: Sequence[str], what: str) -> list[str]:
    """Every value one of ``choices`` (see :func:`choose`)."""
    return [choose(v, choices, what) for v in values]


def check_allocation(allocation: str | None, structured: bool, what: str = "allocation",
                     files: bool = True) -> None:
    """A layerwise allocation: None, a known method, or (``files``) an allocation file; and it needs
    unstructured sparsity (N:M fixes every layer's sparsity)."""
    if allocation is None:
        return
    if allocation not in ALLOCATIONS and not (files and Path(allocation).is_file()):
        close = difflib.get_close_matches(str(allocation), ALLOCATIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"{what}: {allocation!r} is neither {' nor '.join(ALLOCATIONS)}"
                        f"{' nor an allocation file' if files else ''}; {hint}"
                        f"choose {', '.join(ALLOCATIONS)}{' or the path of a file from prunerzero allocate' if files else ''}")
    allocation_needs_unstructured(structured, what)


def allocation_needs_unstructured(structured: bool, what: str = "allocation") -> None:
    """N:M fixes every layer's sparsity: a layerwise allocation needs unstructured sparsity."""
    if structured:
        raise UserError(f"{what}: a layerwise allocation needs unstructured sparsity (N:M fixes every layer); "
                        "use pattern unstructured or drop the allocation")
