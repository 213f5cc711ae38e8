"""SymPy forms of trees: the symbols, and SymPy expressions back to nested tree tuples.

Statistics are declared positive, so SymPy cancels ``sqrt(x**2)`` and ``Abs(x)`` exactly as the
torch semantics do on them. Going back, an expression is expressible when every number is one of
the registry's constants and every function is an operator's SymPy image.
"""

from __future__ import annotations

from typing import Any

import sympy

from prunerzero.primitives.registry import (
    FEATURES,
    TERMINALS,
    ColNorm,
    ColZ,
    InvNorm,
    Mms,
    RowNorm,
    RowZ,
    Zsn,
    constant_name,
    is_constant,
)

SYMBOLS: dict[str, sympy.Symbol] = {name: sympy.Symbol(name, positive=True) for name in TERMINALS}
# Allocation features may be 0 (depth of the first block, the MLP flag): non-negative, not positive.
SYMBOLS.update({name: sympy.Symbol(name, nonnegative=True) for name in FEATURES})


class Inexpressible(Exception):
    pass


_BY_SYMBOL = {v: k for k, v in SYMBOLS.items()}


def _chain(op: str, parts: list[Any]) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = (op, out, p)
    return out


def _constant(e: sympy.Expr) -> str:
    if not e.is_Number:
        raise Inexpressible(e)
    name = constant_name(float(e))
    if name is None or not is_constant(name):
        raise Inexpressible(e)
    return name


_AXIS_FUNCTIONS = {RowNorm: "rown", ColNorm: "coln", RowZ: "rowz", ColZ: "colz", Mms: "mms", Zsn: "zsn"}


def to_nested(e: sympy.Expr) -> Any:
    if e in _BY_SYMBOL:
        return _BY_SYMBOL[e]
    if e.is_Number:
        return _constant(e)
    if isinstance(e, sympy.Add):
        pos, neg = [], []
        for term in e.as_ordered_terms():
            coeff, rest = term.as_coeff_Mul()
            if coeff == -1:
                neg.append(to_nested(rest))
            else:
                pos.append(to_nested(term))
        if not pos:
            return ("neg", _chain("add", neg))
        out = _chain("add", pos)
        for n in neg:
            out = ("sub", out, n)
        return out
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return ("neg", to_nested(rest))
        if coeff != 1:
            return ("mul", _constant(coeff), to_nested(rest))
        factors = list(sympy.Mul.make_args(e))
        norms = [f for f in factors if isinstance(f, InvNorm)]
        others = [f for f in factors if not isinstance(f, InvNorm)]
        if norms:
            if not others:
                raise Inexpressible(e)
            num = _chain("mul", [to_nested(f) for f in others])
            for n in norms:
                num = ("div", num, to_nested(n.args[0]))
            return num
        return _chain("mul", [to_nested(f) for f in factors])
    if isinstance(e, sympy.Pow):
        base, ex = e.args
        b = to_nested(base)
        if ex == 2:
            return ("sqr", b)
        if ex == sympy.Rational(1, 2):
            return ("sqrt", b)
        if ex == 3:
            return ("mul", ("sqr", b), b)
        if ex == 4:
            return ("sqr", ("sqr", b))
        if ex == sympy.Rational(3, 2):
            return ("mul", b, ("sqrt", b))
        if ex == sympy.Rational(1, 4):
            return ("sqrt", ("sqrt", b))
        return ("pow", b, _constant(ex))
    if isinstance(e, sympy.Abs):
        return ("abs", to_nested(e.args[0]))
    if isinstance(e, sympy.log):
        arg = e.args[0]
        inner = arg.args[0] if isinstance(arg, sympy.Abs) else arg
        return ("log", to_nested(inner))
    if isinstance(e, sympy.exp):
        return ("exp", to_nested(e.args[0]))
    if isinstance(e, sympy.tanh):
        return ("tanh", to_nested(e.args[0]))
    for fn, name in _AXIS_FUNCTIONS.items():
        if isinstance(e, fn):
            return (name, to_nested(e.args[0]))
    raise Inexpressible(e)
