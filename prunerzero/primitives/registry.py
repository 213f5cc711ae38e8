"""The one registry of operators: name, arity, torch implementation, SymPy counterpart.

Everything else (the DEAP primitive set, tree evaluation, simplification, JSON) is generated from
this table, so an operator cannot mean one thing in the search and another when pruning.

Semantics follow the reference Pruner-Zero code, which is what the published tree was found with:
``log(x) = log(|x| + 0.001)``, ``sqrt(x) = sqrt(|x|)``, ``exp`` clamps its input at 100, ``mms`` and
``zsn`` are tensor-wide, and ``div(x, y) = x / ||y||`` (the Frobenius norm of the whole tensor y).

Beyond the reference: axis-wise operators normalise an entry against its own output row or input
column (``rown``, ``coln``: divide by the sum of |values| along the axis; ``rowz``, ``colz``: z-score
along the axis), which makes RIA expressible; numeric constants (leaves such as ``0.5``) and
``pow(x, c) = |x| ** c`` with ``c`` a constant leaf. Axis-wise operators see their input broadcast
to the layer's shape first: a statistic of shape (1, in) such as ``X`` is the same row for every
output, so ``rown(X)`` is ``X / sum(X)`` in every row and ``coln(X)`` is the constant ``1 / out``.

Protection: the output of every operator that can overflow goes through :func:`finite`, which maps
NaN to 0 and +-Inf to the largest finite float of the dtype; the others (``bounded=True``) cannot
leave the finite range on finite input, which :func:`register` checks on extreme probes. Each
operator also documents its own guard in ``protection`` (for instance ``mms`` of a constant tensor is
0 instead of 0/0). Operators work on fresh tensors in place where they can: a fitness evaluation
runs every tree over the whole model, and each extra pass over it costs time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
import torch

TERMINALS: tuple[str, ...] = ("W", "G", "X")
# Per-layer features an *allocation function* reads (``search.space: allocation``): each is a vector
# with one entry per prunable layer, and the function's output sets each layer's sparsity.
# Scores are those of the run's fixed metric on the dense model (``search.metric``).
FEATURES: dict[str, str] = {
    "D": "relative depth of the layer's decoder block (0 first, 1 last)",
    "T": "1 for an attention projection, 0 for an MLP one",
    "B": "outlier ratio (%) of the block's scores: share above M times their mean (OWL's feature)",
    "O": "outlier ratio (%) of the layer's own scores",
    "M": "mean |score| of the layer",
    "S": "standard deviation of the layer's |scores|",
    "E": "entropy of the layer's |scores| as a distribution, over log(number of weights) (0..1)",
}
# Statistics that exist only inside a weight update (``update: obs``, :mod:`prunerzero.pruning.obs`). The
# letter D is shared with the allocation feature above; the two never meet (metric vs allocation trees).
OBS_TERMINALS: dict[str, str] = {
    "D": "per input column, 1 / [H^-1]_jj from SparseGPT's Cholesky factor of the inverse Hessian (update: obs only)",
}
LEAVES: tuple[str, ...] = TERMINALS + tuple(FEATURES)  # every named leaf a tree may hold
# Numeric leaves a tree may hold (canonical text). A search draws from the subset its config names
# (``search.constants``); any of these is accepted in a tree given by a user.
CONSTANTS: tuple[str, ...] = ("0.1", "0.25", "0.5", "0.75", "1", "1.5", "2", "3", "4")


def constant_name(value: float | str) -> str | None:
    """The canonical text of a numeric leaf (``2.0`` -> ``2``), or None if it is not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v != v or v in (float("inf"), float("-inf")):
        return None
    return f"{v:g}"


def is_constant(name: str) -> bool:
    return name in CONSTANTS

LOG_EPS = 0.001
EXP_CLAMP = 100.0


def finite(t: torch.Tensor) -> torch.Tensor:
    """Replace NaN by 0 and +-Inf by the largest finite value, so no NaN/Inf escapes an operator."""
    big = torch.finfo(t.dtype).max
    return torch.nan_to_num(t, nan=0.0, posinf=big, neginf=-big)


# SymPy stand-ins for the tensor-wide operators. They are opaque functions: SymPy may not see
# through them, which keeps simplification honest (mms(x) is not elementwise).
class Mms(sympy.Function):
    """Min-max scaling over the whole tensor."""


class Zsn(sympy.Function):
    """Z-score normalisation over the whole tensor."""


class RowNorm(sympy.Function):
    """x / sum(|x|) along the output row."""


class ColNorm(sympy.Function):
    """x / sum(|x|) along the input column."""


class RowZ(sympy.Function):
    """z-score along the output row."""


class ColZ(sympy.Function):
    """z-score along the input column."""


class InvNorm(sympy.Function):
    """1 / ||y|| over the whole tensor y (the reference ``div`` is x / ||y||)."""

    is_positive = True


def _mms(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    span = hi - lo
    if not torch.isfinite(span) or span <= 0:
        return torch.zeros_like(x)
    return (x - lo).div_(span)


def _zsn(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(x)
    return (x - x.mean()).div_(std)


def _div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(y.float()).to(y.dtype)
    if not torch.isfinite(norm) or norm <= 0:
        return x
    return x / norm


def _axis_sum_norm(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        # 0 / 0 (an all-zero row) is NaN, which finite() maps to 0
        return x / x.abs().sum(dim=dim, keepdim=True)
    return fn


def _axis_zscore(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[dim] < 2:
            return torch.zeros_like(x)
        std, mean = torch.std_mean(x, dim=dim, keepdim=True)
        out = (x - mean).div_(std)
        return out.masked_fill_((std <= 0) | ~torch.isfinite(std), 0.0)
    return fn


def _pow(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    if exponent.numel() == 1:  # a constant leaf: one scalar power is much faster than a tensor one
        return torch.abs(x).pow_(float(exponent.reshape(())))
    return torch.abs(x).pow(exponent)


@dataclass(frozen=True)
class Operator:
    """One operator of the search space.

    ``torch_fn`` takes ``arity`` tensors (broadcastable) and returns a tensor; ``sympy_fn`` takes
    ``arity`` SymPy expressions. ``protection`` says how the torch version avoids NaN/Inf.
    """

    name: str
    arity: int
    torch_fn: Callable[..., torch.Tensor]
    sympy_fn: Callable[..., sympy.Expr]
    protection: str
    bounded: bool = False  # finite input gives finite output, so finite() is not needed
    axis: int | None = None  # axis-wise operators: the input is broadcast to the layer shape first

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != self.arity:
            raise TypeError(f"operator {self.name} takes {self.arity} argument(s), got {len(args)}")
        out = self.torch_fn(*args)
        if self.bounded:
            return out
        if any(out.data_ptr() == a.data_ptr() for a in args):  # a view of an input: do not write it
            return finite(out)
        big = torch.finfo(out.dtype).max
        return out.nan_to_num_(nan=0.0, posinf=big, neginf=-big)


OPERATORS: dict[str, Operator] = {}


def register(op: Operator) -> Operator:
    """Add an operator after checking it: unique name, and finite output on zeros, negatives,
    large values and mixed inputs (gplearn's lesson: check an operator when it is registered)."""
    if op.name in OPERATORS or op.name in TERMINALS or is_constant(op.name):
        raise ValueError(f"operator name {op.name!r} is already taken")
    if op.arity not in (1, 2):
        raise ValueError(f"operator {op.name!r}: arity must be 1 or 2, got {op.arity}")
    probes = [
        torch.zeros(4, 6),
        -torch.rand(4, 6) - 0.5,
        torch.full((4, 6), 1e30),
        torch.randn(4, 6) * 1e20,
        torch.ones(4, 6),
    ]
    for a in probes:
        for b in probes if op.arity == 2 else [None]:
            out = op(a) if b is None else op(a, b)
            if out.shape != a.shape or not torch.isfinite(out).all():
                raise ValueError(f"operator {op.name!r} is not protected: non-finite or wrong shape")
    OPERATORS[op.name] = op
    return op


register(Operator("add", 2, torch.add, lambda a, b: a + b, "none needed beyond finite()"))
register(Operator("sub", 2, torch.sub, lambda a, b: a - b, "none needed beyond finite()"))
register(Operator("mul", 2, torch.mul, lambda a, b: a * b, "overflow to Inf clamped by finite()"))
register(Operator(
    "div", 2, _div, lambda a, b: a * InvNorm(b),
    "x / ||y|| (tensor-wide norm, as in the reference); ||y|| = 0 or non-finite returns x",
))
register(Operator("abs", 1, torch.abs, sympy.Abs, "none needed", bounded=True))
register(Operator("neg", 1, torch.neg, lambda a: -a, "none needed", bounded=True))
register(Operator("sqr", 1, torch.square, lambda a: a**2, "overflow to Inf clamped by finite()"))
register(Operator(
    "sqrt", 1, lambda x: torch.abs(x).sqrt_(), lambda a: sympy.sqrt(sympy.Abs(a)),
    "sqrt(|x|): defined for negative inputs", bounded=True,
))
register(Operator(
    "exp", 1, lambda x: x.clamp(max=EXP_CLAMP).exp_(), sympy.exp,
    f"input clamped at {EXP_CLAMP:g} (as in the reference); fp32 overflow clamped by finite()",
))
# SymPy drops the 0.001 of the protected log so that exp(log(x)) and log(exp(x)) cancel (the
# paper's OOS). Every simplification is checked numerically on masks before it is accepted.
register(Operator(
    "log", 1, lambda x: torch.abs(x).add_(LOG_EPS).log_(), lambda a: sympy.log(sympy.Abs(a)),
    f"log(|x| + {LOG_EPS:g}): defined for zero and negative inputs", bounded=True,
))
register(Operator("tanh", 1, torch.tanh, sympy.tanh, "bounded, none needed", bounded=True))
register(Operator(
    "sigmoid", 1, torch.sigmoid, lambda a: 1 / (1 + sympy.exp(-a)), "bounded, none needed", bounded=True,
))
register(Operator(
    "mms", 1, _mms, Mms, "min-max scale over the whole tensor; a constant tensor gives 0",
    bounded=True,
))
register(Operator("zsn", 1, _zsn, Zsn, "z-score over the whole tensor (unbiased std); zero std gives 0"))
register(Operator(
    "rown", 1, _axis_sum_norm(1), RowNorm,
    "x / sum(|x|) along its output row (over inputs); an all-zero row gives 0", axis=1,
))
register(Operator(
    "coln", 1, _axis_sum_norm(0), ColNorm,
    "x / sum(|x|) along its input column (over outputs); an all-zero column gives 0", axis=0,
))
register(Operator(
    "rowz", 1, _axis_zscore(1), RowZ, "z-score along its output row (unbiased std); zero std gives 0", axis=1,
))
register(Operator(
    "colz", 1, _axis_zscore(0), ColZ, "z-score along its input column (unbiased std); zero std gives 0", axis=0,
))
register(Operator(
    "pow", 2, _pow, lambda a, c: sympy.Abs(a) ** c,
    "|x| ** c with c a constant leaf (a tree checks this); overflow clamped by finite()",
))

# The reference search space (Pruner-Zero's gptree.py, minus its aliases pow=sqr and skp=identity).
DEFAULT_OPERATORS: tuple[str, ...] = (
    "add", "sub", "mul", "div", "abs", "neg", "sqr", "sqrt", "exp", "log", "tanh", "mms", "zsn",
)
# The reference space plus the axis-wise operators (RIA lives here) and pow.
EXTENDED_OPERATORS: tuple[str, ...] = DEFAULT_OPERATORS + ("rown", "coln", "rowz", "colz", "pow")
