"""Expression trees over the registry: prefix lists of node names, like DEAP's PrimitiveTree.

A :class:`Tree` is an immutable tuple of names in prefix order (``("mul", "W", "G")``). It converts
to and from the Pruner-Zero JSON format (``{"data": "mul", "left": {...}, "right": {...}}``), a
formula string (``mul(W, G)``, the same text DEAP prints), SymPy, and a torch score tensor.
Parsing never calls ``eval``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sympy
import torch

from prunerzero.errors import UserError
from prunerzero.primitives.registry import (
    CONSTANTS,
    LEAVES,
    OPERATORS,
    TERMINALS,
    constant_name,
    is_constant,
)
from prunerzero.primitives.symbolic import SYMBOLS, Inexpressible, to_nested

# Caps that keep every walk over a tree cheap and every recursive one (SymPy, JSON) far from
# Python's recursion limit; a search's own bloat limits are far below them.
MAX_NODES = 2000
MAX_HEIGHT = 100

def _arity(name: str) -> int:
    return OPERATORS[name].arity if name in OPERATORS else 0


def _known(name: str) -> bool:
    return name in OPERATORS or name in LEAVES or is_constant(name)


def _unknown_message(name: object, where: str) -> str:
    what = "constant" if constant_name(name) is not None else "operator or terminal"  # type: ignore[arg-type]
    return (f"unknown {what} {name!r} at {where}; known operators: {', '.join(sorted(OPERATORS))}; "
            f"terminals: {', '.join(TERMINALS)} (allocation features: {', '.join(LEAVES[len(TERMINALS):])}); constants: {', '.join(CONSTANTS)}")


def _places(nodes: Sequence[str]) -> list[str]:
    """The place of each prefix node in the tree, in the words of the JSON format (``root.left``)."""
    places, pending = [], ["root"]
    for name in nodes:
        where = pending.pop()
        places.append(where)
        k = _arity(name)
        pending.extend(reversed([f"{where}.left", f"{where}.right"][:k]))
    return places


class Tree:
    """An immutable expression tree stored as a prefix tuple of operator and terminal names."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: Iterable[str]):
        nodes = tuple(nodes)
        if len(nodes) > MAX_NODES:
            raise UserError(f"tree has {len(nodes)} nodes, more than the {MAX_NODES} allowed")
        need = 1
        for i, name in enumerate(nodes):
            if not isinstance(name, str) or not _known(name):
                raise UserError(_unknown_message(name, f"position {i} of the tree"))
            if need == 0:
                raise UserError(f"tree has extra nodes after position {i - 1}: {_short(nodes)}")
            need += _arity(name) - 1
        if need != 0 or not nodes:
            raise UserError(f"tree is incomplete (missing {need} operand(s)): {_short(nodes)}")
        object.__setattr__(self, "nodes", nodes)
        if self.height > MAX_HEIGHT:
            raise UserError(f"tree is {self.height} levels deep, more than the {MAX_HEIGHT} allowed")
        places = None
        for i, name in enumerate(nodes):
            # pow's exponent must be a constant leaf: |x| ** y for a tensor y is not in the space
            if name == "pow" and not is_constant(nodes[self._right_child(i)]):
                places = places or _places(nodes)
                raise UserError(f"pow at {places[i]} needs a constant exponent (one of {', '.join(CONSTANTS)}), "
                                f"got {self.subtree(self._right_child(i))}")

    def _right_child(self, i: int) -> int:
        """Index of the right child of the binary node at prefix index i."""
        return self._end(i + 1)

    def _end(self, i: int) -> int:
        """Index just past the subtree that starts at prefix index i."""
        need = 1
        while need:
            need += _arity(self.nodes[i]) - 1
            i += 1
        return i

    def subtree(self, i: int) -> "Tree":
        return Tree(self.nodes[i:self._end(i)])

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Tree is immutable")

    # ---------------------------------------------------------------- basic properties
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and other.nodes == self.nodes

    def __hash__(self) -> int:
        return hash(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Tree({str(self)!r})"

    @property
    def height(self) -> int:
        """Depth of the deepest node; a lone terminal has height 0 (DEAP's convention)."""
        stack: list[int] = [0]
        best = 0
        for name in self.nodes:
            depth = stack.pop()
            best = max(best, depth)
            stack.extend([depth + 1] * _arity(name))
        return best

    @property
    def terminals(self) -> set[str]:
        return {n for n in self.nodes if n in LEAVES}

    @property
    def constants(self) -> set[str]:
        return {n for n in self.nodes if is_constant(n)}

    @property
    def operators(self) -> set[str]:
        return {n for n in self.nodes if n in OPERATORS}

    # ---------------------------------------------------------------- nested form
    def _nested(self) -> Any:
        """Nested tuples ``(name, child, ...)``; terminals are plain strings."""
        stack: list[Any] = []
        for name in reversed(self.nodes):
            k = _arity(name)
            if k == 0:
                stack.append(name)
            else:
                children = [stack.pop() for _ in range(k)]
                stack.append((name, *children))
        return stack[0]

    @classmethod
    def _from_nested(cls, nested: Any) -> "Tree":
        out: list[str] = []

        def walk(n: Any) -> None:
            if isinstance(n, str):
                out.append(n)
            else:
                out.append(n[0])
                for c in n[1:]:
                    walk(c)

        walk(nested)
        return cls(out)

    # ---------------------------------------------------------------- formula text
    def __str__(self) -> str:
        def fmt(n: Any) -> str:
            if isinstance(n, str):
                return n
            return f"{n[0]}({', '.join(fmt(c) for c in n[1:])})"

        return fmt(self._nested())

    @classmethod
    def parse(cls, text: str) -> "Tree":
        """Parse ``mul(abs(W), pow(X, 0.25))``. Only names, numbers, parentheses and commas are accepted."""
        if not isinstance(text, str):
            raise UserError(f"a formula must be text, got {type(text).__name__}")
        tokens = re.findall(r"[A-Za-z_][A-Za-z_0-9]*|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+|[(),]|\S", text)
        nodes: list[str] = []
        shape: list[str] = []  # the formula with every name and number replaced by its canonical text
        for tok in tokens:
            if tok in "(),":
                shape.append(tok)
                continue
            if re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", tok):
                name = tok
            elif constant_name(tok) is not None:
                name = constant_name(tok)
                if not is_constant(name):
                    raise UserError(_unknown_message(tok, f"position {len(nodes)} of formula {_short(text)!r}"))
            else:
                raise UserError(f"unexpected character {tok!r} in formula {_short(text)!r}")
            nodes.append(name)
            shape.append(name)
        tree = cls(nodes)
        if re.sub(r"\s", "", str(tree)) != "".join(shape):
            raise UserError(f"formula {_short(text)!r} is not well formed; expected e.g. mul(abs(W), sqrt(X))")
        return tree

    # ---------------------------------------------------------------- Pruner-Zero JSON
    def to_json(self) -> dict[str, Any]:
        def enc(n: Any) -> dict[str, Any]:
            if isinstance(n, str):
                return {"data": float(n) if is_constant(n) else n}
            d: dict[str, Any] = {"data": n[0], "left": enc(n[1])}
            if len(n) > 2:
                d["right"] = enc(n[2])
            return d

        return enc(self._nested())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Tree":
        """Read the Pruner-Zero format; errors name the offending node's place (``root.left``)."""

        def dec(d: Any, where: str) -> Any:
            if where.count(".") > MAX_HEIGHT:
                raise UserError(f"tree is more than {MAX_HEIGHT} levels deep at {where[:40]}...")
            if not isinstance(d, Mapping) or "data" not in d:
                raise UserError(f"tree node at {where} must be an object with a 'data' key, got {_short(repr(d))}")
            name = d["data"]
            if isinstance(name, (int, float)) and not isinstance(name, bool):
                name = constant_name(name)
            if not isinstance(name, str) or not _known(name):
                raise UserError(_unknown_message(d["data"] if isinstance(d["data"], (str, int, float)) else
                                                 _short(repr(d["data"])), where))
            k = _arity(name)
            children = [c for c in ("left", "right") if d.get(c) is not None]
            expected = ["left", "right"][:k]
            if children != expected:
                raise UserError(
                    f"node {name!r} at {where} takes {k} operand(s) ({', '.join(expected) or 'none'})"
                    f", found {', '.join(children) or 'none'}"
                )
            if k == 0:
                return name
            return (name, *[dec(d[c], f"{where}.{c}") for c in expected])

        return cls._from_nested(dec(data, "root"))

    @classmethod
    def load(cls, path: str | Path) -> "Tree":
        """A tree file: a bare Pruner-Zero tree, or an export / shipped file ``{"trees": [{"tree": ...}]}``
        (the first, best, tree is taken)."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"tree file {path} is a directory; give a JSON file (e.g. runs/NAME/export.json)")
        if not path.is_file():
            raise UserError(f"tree file {path} does not exist")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"tree file {path} is not text (UTF-8 JSON expected)") from None
        except json.JSONDecodeError as e:
            raise UserError(f"tree file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        except RecursionError:
            raise UserError(f"tree file {path} is nested too deeply (a tree may be {MAX_HEIGHT} levels deep)") from None
        if isinstance(data, Mapping) and "trees" in data and "data" not in data:
            trees = data["trees"]
            if not isinstance(trees, list) or not trees:
                raise UserError(f"tree file {path}: 'trees' must be a non-empty list of {{\"tree\": ...}} records")
            if not isinstance(trees[0], Mapping) or "tree" not in trees[0]:
                raise UserError(f"tree file {path}: trees[0] must be an object with a 'tree' key")
            data = trees[0]["tree"]
        try:
            return cls.from_json(data)
        except UserError as e:
            raise UserError(f"tree file {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    # ---------------------------------------------------------------- torch evaluation
    def evaluate(self, stats: Mapping[str, torch.Tensor], shape: Sequence[int] | None = None) -> torch.Tensor:
        """Score tensor for one layer. ``stats`` maps terminal names to tensors; the result has
        ``shape`` (``(out, in)`` for a linear layer), by default the broadcast shape of all the
        terminals given. Given a shape, ``stats`` needs only the terminals the tree uses."""
        missing = self.terminals - set(stats)
        if missing:
            raise UserError(f"tree {self} needs statistic(s) {', '.join(sorted(missing))}, not computed")
        if shape is None:
            shape = torch.broadcast_shapes(*(t.shape for t in stats.values()))
        shape = torch.Size(shape)
        dtype = next(iter(stats.values())).dtype if stats else torch.float32
        device = next(iter(stats.values())).device if stats else None
        stack: list[torch.Tensor] = []
        for name in reversed(self.nodes):
            if name in LEAVES:
                stack.append(stats[name])
            elif is_constant(name):
                stack.append(torch.tensor(float(name), dtype=dtype, device=device))
            else:
                op = OPERATORS[name]
                args = [stack.pop() for _ in range(op.arity)]
                if op.axis is not None:  # broadcast first: X of shape (1, in) is the same row for every output
                    args = [a.expand(shape) for a in args]
                elif op.arity == 2 and name != "pow":
                    args = list(torch.broadcast_tensors(*args))
                stack.append(op(*args))
        out = stack[0]
        return out.expand(shape) if out.shape != shape else out

    # ---------------------------------------------------------------- SymPy
    def symbolic_key(self) -> str:
        """The canonical key of the tree's SymPy form: equal keys mean the same metric (what the
        search's formula cache and the known-metric lookups compare)."""
        return f"sympy:{sympy.srepr(self.to_sympy())}"

    def to_sympy(self) -> sympy.Expr:
        stack: list[sympy.Expr] = []
        for name in reversed(self.nodes):
            if name in LEAVES:
                stack.append(SYMBOLS[name])
            elif is_constant(name):
                stack.append(sympy.nsimplify(name))
            else:
                op = OPERATORS[name]
                stack.append(op.sympy_fn(*[stack.pop() for _ in range(op.arity)]))
        return stack[0]

    @classmethod
    def from_sympy(cls, expr: sympy.Expr) -> "Tree | None":
        """Rebuild a tree from a SymPy expression; None where the operator set cannot express it
        (numbers outside the constants, negative powers, ...)."""
        try:
            return cls._from_nested(to_nested(expr))
        except (Inexpressible, UserError, RecursionError):
            return None


def _short(text: Any, limit: int = 120) -> str:
    text = text if isinstance(text, str) else " ".join(map(str, text))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
