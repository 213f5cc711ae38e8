import json

import pytest
import sympy
import torch

from prunerzero.errors import UserError
from prunerzero.primitives.registry import OPERATORS, Operator, finite, register
from prunerzero.primitives.tree import Tree


def test_every_operator_is_protected_on_hostile_inputs():
    hostile = [torch.zeros(3, 5), torch.full((3, 5), -1e38), torch.full((3, 5), 1e38), torch.full((3, 5), float("nan")),
               torch.full((3, 5), float("inf")), torch.full((3, 5), -float("inf")), torch.randn(3, 5) * 1e20]
    for op in OPERATORS.values():
        # bounded operators promise finite output for finite input only (terminals are sanitised
        # once, when statistics are loaded); the others for any input
        inputs = [a for a in hostile if torch.isfinite(a).all()] if op.bounded else hostile
        for a in inputs:
            for b in (inputs if op.arity == 2 else [None]):
                out = op(a) if b is None else op(a, b)
                assert torch.isfinite(out).all(), (op.name, a[0, 0], None if b is None else b[0, 0])


def test_operators_never_write_their_inputs():
    for op in OPERATORS.values():
        a, b = torch.randn(3, 5) * 1e30, torch.randn(3, 5)
        before = (a.clone(), b.clone())
        op(a) if op.arity == 1 else op(a, b)
        assert torch.equal(a, before[0]) and torch.equal(b, before[1]), op.name


def test_reference_semantics():
    x = torch.tensor([[-2.0, 0.0, 3.0]])
    assert torch.allclose(OPERATORS["log"](x), torch.log(x.abs() + 0.001))
    assert torch.allclose(OPERATORS["sqrt"](x), torch.sqrt(x.abs()))
    assert OPERATORS["exp"](torch.tensor([[200.0]])).item() == torch.finfo(torch.float32).max  # clamp then finite
    assert torch.allclose(OPERATORS["mms"](x), torch.tensor([[0.0, 0.4, 1.0]]))
    assert torch.allclose(OPERATORS["div"](x, x), x / torch.linalg.vector_norm(x))  # x / ||y||, tensor-wide
    assert torch.allclose(OPERATORS["zsn"](x), (x - x.mean()) / x.std())


def test_specific_protections():
    const = torch.full((2, 3), 5.0)
    assert torch.equal(OPERATORS["mms"](const), torch.zeros(2, 3))  # 0/0 in the reference
    assert torch.equal(OPERATORS["zsn"](const), torch.zeros(2, 3))
    assert torch.equal(OPERATORS["div"](const, torch.zeros(2, 3)), const)  # ||y|| = 0
    assert torch.isfinite(OPERATORS["log"](torch.zeros(1))).all()
    assert finite(torch.tensor([float("nan")])).item() == 0.0


def test_registration_rejects_unprotected_and_duplicate_operators():
    with pytest.raises(ValueError, match="not protected"):  # wrong shape: not elementwise-compatible
        register(Operator("flat", 1, lambda x: x.reshape(-1), lambda a: a, "none"))
    assert "flat" not in OPERATORS
    with pytest.raises(ValueError, match="already taken"):
        register(Operator("add", 2, torch.add, lambda a, b: a + b, "none"))


def test_json_round_trip_and_reference_format(tmp_path):
    tree = Tree.parse("mul(abs(mul(W, W)), mms(G))")
    data = tree.to_json()
    assert data == {"data": "mul", "left": {"data": "abs", "left": {"data": "mul", "left": {"data": "W"}, "right": {"data": "W"}}},
                    "right": {"data": "mms", "left": {"data": "G"}}}
    path = tmp_path / "t.json"
    tree.save(path)
    assert Tree.load(path) == tree
    assert Tree.from_json(json.loads(json.dumps(data))) == tree


def test_published_tree_file_and_formula():
    from prunerzero.primitives.known import resolve_tree

    tree = resolve_tree("pruner-zero")
    assert str(tree) == "mul(abs(mul(W, W)), mms(G))"
    assert str(tree.to_sympy()) == "W**2*Mms(G)"
    w, g = torch.randn(4, 8).abs(), torch.rand(4, 8)
    expected = (w * w).abs() * (g - g.min()) / (g.max() - g.min())
    assert torch.allclose(tree.evaluate({"W": w, "G": g}), expected)


def test_bad_trees_name_the_problem_and_place(tmp_path):
    bad = {"data": "mul", "left": {"data": "W"}, "right": {"data": "abs", "left": {"data": "Q"}}}
    with pytest.raises(UserError, match=r"'Q' at root\.right\.left"):
        Tree.from_json(bad)
    with pytest.raises(UserError, match="takes 2 operand"):
        Tree.from_json({"data": "mul", "left": {"data": "W"}})
    with pytest.raises(UserError, match="unknown operator or terminal 'foo'"):
        Tree.parse("mul(W, foo(G))")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Tree.load(p)
    with pytest.raises(UserError, match="does not exist"):
        Tree.load(tmp_path / "missing.json")


def test_parse_never_evaluates_code():
    with pytest.raises(UserError):
        Tree.parse("__import__('os').system('true')")


def test_height_size_and_sympy_round_trip():
    t = Tree.parse("add(sqrt(W), mul(G, X))")
    assert len(t) == 6 and t.height == 2 and Tree.parse("W").height == 0
    assert Tree.from_sympy(t.to_sympy()) is not None
    assert Tree.from_sympy(sympy.Integer(3)) == Tree(["3"])  # a constant of the set
    assert Tree.from_sympy(sympy.Integer(7)) is None  # not a constant of the set
    assert Tree.from_sympy(sympy.Symbol("W", positive=True) ** -1) is None


def test_x_broadcasts_over_rows():
    t = Tree.parse("mul(abs(W), sqrt(X))")
    w, x = torch.randn(5, 7), torch.rand(1, 7)
    assert torch.allclose(t.evaluate({"W": w.abs(), "X": x}), w.abs() * x.sqrt())
    assert Tree.parse("X").evaluate({"W": w, "X": x}).shape == (5, 7)
    # given the layer's shape, a tree needs only its own terminals
    assert torch.equal(Tree.parse("zsn(X)").evaluate({"X": x}, (5, 7)), Tree.parse("zsn(X)").evaluate({"W": w, "X": x}))
    with pytest.raises(UserError, match="needs statistic"):
        Tree.parse("mul(W, X)").evaluate({"X": x}, (5, 7))
    with pytest.raises(RuntimeError):
        Tree.parse("X").evaluate({"X": x}, (5, 8))  # X cannot broadcast to the shape asked


def test_deap_conversion_round_trip():
    from prunerzero.primitives.deap_set import primitive_set, to_individual, to_tree

    pset = primitive_set(list(OPERATORS), ["W", "G", "X"], ["0.5", "2"])
    tree = Tree.parse("mul(abs(mul(W, W)), mms(G))")
    ind = to_individual(tree, pset)
    assert str(ind) == str(tree) and to_tree(ind) == tree
    with pytest.raises(UserError, match="outside this search space"):
        to_individual(tree, primitive_set(["add"], ["W"]))
