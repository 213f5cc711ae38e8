"""The one registry of known metrics: name -> tree, with where it comes from.

Used by ``prune --method``, ``--tree NAME``, the search's seeding (``seed_known_metrics``), the
held-out evaluation and the report, so a known metric is defined once. Every tree here ranks per
output row (or per N:M group), like any tree; ``prune --method magnitude`` alone ranks over the
whole layer, as the reference code's ``prune_magnitude`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunerzero.choices import UPDATES
from prunerzero.errors import UserError
from prunerzero.files import read_json
from prunerzero.primitives.registry import OBS_TERMINALS, TERMINALS
from prunerzero.primitives.tree import Tree


@dataclass(frozen=True)
class KnownMetric:
    name: str
    formula: str
    source: str

    @property
    def tree(self) -> Tree:
        return Tree.parse(self.formula)


KNOWN_METRICS: dict[str, KnownMetric] = {m.name: m for m in (
    KnownMetric("magnitude", "abs(W)", "Han et al. 2015 (|W|)"),
    KnownMetric("wanda", "mul(abs(W), sqrt(X))", "Sun et al., ICLR 2024: |W| * ||X_j||"),
    # RIA's reference code: (|W| / sum_col |W| + |W| / sum_row |W|) * sqrt(scaler_row) ** a, a = 0.5.
    # X is scaler_row, so sqrt(X) ** 0.5 = sqrt(sqrt(X)); W is already |W|.
    KnownMetric("ria", "mul(add(coln(W), rown(W)), sqrt(sqrt(X)))",
                "Zhang et al., ICLR 2024 (relative importance and activations, a = 0.5, no channel permutation)"),
    KnownMetric("pruner-zero", "mul(abs(mul(W, W)), mms(G))", "Dong et al., ICML 2024 (the published tree)"),
    # SparseGPT's saliency w^2 / [H^-1]_jj^2, which exists only inside its OBS update (update: obs).
    KnownMetric("sparsegpt", "sqr(mul(W, D))", "Frantar & Alistarh, ICML 2023 (its mask rule inside the OBS update)"),
)}


# Known allocation functions (search.space: allocation), seeded like the known metrics. OWL maps
# the block's outlier ratio to sparsities, exactly the mapping every allocation function goes through.
KNOWN_ALLOCATIONS: dict[str, KnownMetric] = {m.name: m for m in (
    KnownMetric("owl", "B", "Yin et al., ICML 2024 (outlier-weighed layerwise sparsity; M and lambda from the config)"),
)}


def known_tree(name: str) -> Tree | None:
    metric = KNOWN_METRICS.get(name)
    return metric.tree if metric else None


# Metrics discovered by prunerzero and shipped with it: prunerzero/trees/NAME.json, in the export
# format (``{"trees": [{"tree": ..., "formula": ..., "fitness": ..., ...}]}``).
SHIPPED_TREES = Path(__file__).resolve().parent.parent / "trees"


def shipped_trees() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED_TREES.glob("*.json"))}


def tree_update(spec: str) -> str:
    """The weight update a shipped tree file (or an export file) records it was found with: ``obs``
    or ``none`` (files written before updates existed say nothing: none)."""
    path = shipped_trees().get(spec) or (Path(spec) if spec.endswith(".json") and Path(spec).is_file() else None)
    if path is None:
        return "none"
    data = read_json(path, "tree file")
    update = data.get("update", "none") if isinstance(data, dict) else "none"
    if update not in UPDATES:
        raise UserError(f"tree file {path} records update {update!r}; prunerzero knows none and obs")
    return update


def metric_only(tree: Tree) -> Tree:
    """The tree, if it is a pruning metric (it reads W, G, X, or D inside the OBS update; not allocation features)."""
    features = sorted(tree.terminals - set(TERMINALS) - set(OBS_TERMINALS))
    if features:
        raise UserError(f"{tree} reads allocation feature(s) {', '.join(features)}: it is an allocation function, "
                        "not a metric; pass its allocation file to --allocation instead")
    return tree


def resolve_tree(spec: str) -> Tree:
    """A tree from a known metric's name (``ria``), a shipped tree's name, a formula, or a JSON file.

    A text that parses as a formula is never tried as a file name."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("--tree needs a metric name, a formula such as mul(abs(W), sqrt(X)), or a JSON file")
    spec = spec.strip()
    if spec in KNOWN_METRICS:
        return KNOWN_METRICS[spec].tree
    shipped = shipped_trees()
    if spec in shipped:
        return Tree.load(shipped[spec])
    if "(" in spec or spec in TERMINALS:
        return metric_only(Tree.parse(spec))
    path = Path(spec)
    if path.exists() or spec.endswith(".json"):
        return metric_only(Tree.load(path))
    names = ", ".join([*KNOWN_METRICS, *shipped])
    raise UserError(f"tree {spec!r} is not a known metric ({names}), a formula, or an existing JSON file")
