import json

import pytest
import torch

from prunerzero.errors import UserError
from prunerzero.models import prunable_linears, resolve_model
from prunerzero.primitives.known import known_tree
from prunerzero.primitives.tree import Tree
from prunerzero.pruning.masks import PackedMasks, Pattern, check_sparsity, prune_mask
from prunerzero.pruning.obs import obs_prune
from prunerzero.pruning.prune import (
    apply_masks,
    masked_weights,
    measure_sparsity,
    prune_model,
    restore_masks,
    score_masks,
)
from prunerzero.pruning.stats import (
    compute_gradients,
    load_gradients,
    save_tensors_atomic,
)


def test_unstructured_mask_prunes_exactly_per_row_like_the_reference():
    scores = torch.randn(16, 40)
    mask = prune_mask(scores, 0.5)
    assert (mask.sum(1) == 20).all()
    # every pruned score in a row is <= every kept score of that row
    for r in range(16):
        assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()
    # the reference: stable sort per row, first int(in * s) indices
    ref = torch.zeros_like(mask).scatter_(1, torch.sort(scores, dim=-1, stable=True)[1][:, :int(40 * 0.5)], True)
    assert torch.equal(mask, ref)
    assert (prune_mask(scores, 0.3).sum(1) == 12).all()


def test_ties_are_broken_like_the_reference_stable_sort():
    # integer scores tie a lot; the selection's tie repair must give the stable sort's choice
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, cols = torch.randint(1, 12, (2,), generator=gen).tolist()
        cols = max(cols, 2)
        scores = torch.randint(0, 4, (rows, cols), generator=gen).float()
        sparsity = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
        k = int(cols * sparsity)
        ref = torch.zeros(rows, cols, dtype=torch.bool)
        if k:
            ref.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :k], True)
        assert torch.equal(prune_mask(scores, sparsity), ref)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_masks_prune_n_lowest_of_every_group(n, m):
    scores = torch.randn(8, 32)
    mask = prune_mask(scores, n / m, Pattern(n, m))
    groups = mask.reshape(8, -1, m)
    assert (groups.sum(-1) == n).all()
    s = scores.reshape(8, -1, m)
    assert (s.masked_fill(~groups, -1e9).amax(-1) <= s.masked_fill(groups, 1e9).amin(-1)).all()


def test_pattern_and_sparsity_validation():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    for bad in ("3:2", "2-4", "dense", "0:4"):
        with pytest.raises(UserError, match="pattern"):
            Pattern.parse(bad)
    for s in (0, 1, 1.5, -0.1):
        with pytest.raises(UserError, match=r"outside \(0, 1\)"):
            check_sparsity(s, Pattern())
    with pytest.raises(UserError, match="prunes exactly 0.5"):
        check_sparsity(0.6, Pattern(2, 4))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_methods_reach_the_target_sparsity(tiny_model, windows, method, pattern):
    pat = Pattern.parse(pattern)
    report = prune_model(tiny_model, method, 0.5, pat, windows=windows)
    counts = measure_sparsity(tiny_model)
    for name, lin in prunable_linears(tiny_model).items():
        zeros = lin.weight == 0
        if pat.structured:
            assert (zeros.reshape(lin.weight.shape[0], -1, pat.m).sum(-1) >= pat.n).all(), name
        elif method == "wanda":  # magnitude ranks the whole layer (the reference), SparseGPT a column block
            assert (zeros.sum(1) >= lin.weight.shape[1] // 2).all(), name
        elif method == "magnitude":
            assert int(zeros.sum()) >= lin.weight.numel() // 2, name
    assert abs(report.sparsity_actual - 0.5) < 0.01
    assert set(counts) == set(prunable_linears(tiny_model))
    assert tiny_model.lm_head.weight.ne(0).all() and tiny_model.model.embed_tokens.weight.ne(0).all()


def test_wanda_equals_the_tree_mul_abs_w_sqrt_x(windows):
    from tests.conftest import tiny_llama

    a, b = tiny_llama(), tiny_llama()
    prune_model(a, "wanda", 0.5, Pattern(), windows=windows)
    prune_model(b, "tree", 0.5, Pattern(), windows=windows, tree=known_tree("wanda"))
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_magnitude_equals_tree_abs_w_and_pruner_zero_uses_g(windows):
    from tests.conftest import tiny_llama

    a, b = tiny_llama(), tiny_llama()
    prune_model(a, "magnitude", 0.5, Pattern(2, 4))
    prune_model(b, "tree", 0.5, Pattern(2, 4), tree=Tree.parse("abs(W)"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny_llama()
    grads = compute_gradients(c, windows)
    assert all(g.shape == l.weight.shape and (g >= 0).all() for g, l in zip(grads.values(), prunable_linears(c).values()))
    with pytest.raises(UserError, match="uses G"):
        prune_model(c, "tree", 0.5, Pattern(), tree=known_tree("pruner-zero"))
    prune_model(c, "tree", 0.5, Pattern(), tree=known_tree("pruner-zero"), gradients=grads)
    d = tiny_llama()
    prune_model(d, "magnitude", 0.5, Pattern())
    assert not all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values()))


def test_gradients_are_the_scaled_l2_norm_over_windows(tiny_model, windows):
    grads = compute_gradients(tiny_model, windows[:2], scale=100.0)
    name, lin = next(iter(prunable_linears(tiny_model).items()))
    manual = torch.zeros_like(lin.weight)
    for row in windows[:2]:
        tiny_model.zero_grad()
        ids = row.unsqueeze(0)
        tiny_model(input_ids=ids, labels=ids).loss.backward()
        manual += (lin.weight.grad * 100) ** 2
    tiny_model.zero_grad()
    assert torch.allclose(grads[name], manual.sqrt(), rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in tiny_model.parameters())


def test_gradient_file_shape_mismatch_is_refused(tiny_model, windows, tmp_path):
    grads = compute_gradients(tiny_model, windows[:1])
    good = tmp_path / "g.safetensors"
    save_tensors_atomic(grads, good)
    assert set(load_gradients(good, tiny_model)) == set(grads)
    first = next(iter(grads))
    grads[first] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_tensors_atomic(grads, bad)
    with pytest.raises(UserError, match=r"has shape \(3, 3\) but the model's weight is"):
        load_gradients(bad, tiny_model)
    with pytest.raises(UserError, match="does not exist"):
        load_gradients(tmp_path / "none.safetensors", tiny_model)


def test_apply_and_restore_are_bitwise_exact(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    masks = score_masks(tiny_model, Tree.parse("W"), 0.5, Pattern())
    removed = apply_masks(tiny_model, masks)
    pruned = measure_sparsity(tiny_model)
    assert pruned and all(z == t // 2 for z, t in pruned.values())  # every prunable layer at exactly half
    restore_masks(tiny_model, masks, removed)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_masked_forward_with_packed_or_plain_masks_equals_zeroed_weights(tiny_model):
    masks = score_masks(tiny_model, Tree.parse("W"), 0.5, Pattern())
    packed = PackedMasks.of(masks)
    for name, mask in masks.items():
        assert torch.equal(packed[name], mask) and torch.equal(packed.keep(name), ~mask)
    odd = torch.rand(3, 5) < 0.5  # 15 bits: the packed padding must not leak into the keep mask
    assert torch.equal(PackedMasks.of({"odd": odd}).keep("odd"), ~odd)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    with torch.no_grad():
        with masked_weights(tiny_model, masks) as plain:
            out_plain = tiny_model(input_ids=ids).logits
        with masked_weights(tiny_model, packed) as applied:
            out_packed = tiny_model(input_ids=ids).logits
        dense = tiny_model(input_ids=ids).logits
        removed = apply_masks(tiny_model, masks)
        zeroed = tiny_model(input_ids=ids).logits
        restore_masks(tiny_model, masks, removed)
    assert torch.equal(out_plain, zeroed) and torch.equal(out_packed, zeroed) and not torch.equal(dense, zeroed)
    assert plain.seconds > 0 and applied.seconds > 0


def test_sparsegpt_beats_magnitude_on_layer_reconstruction():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(512, 64) * torch.exp(torch.randn(64))
    h = 2 * x.t() @ x / x.shape[0]
    pruned = obs_prune(w, h, 0.5, Pattern())
    mag = w.masked_fill(prune_mask(w.abs(), 0.5), 0)
    err = lambda v: ((x @ v.t() - x @ w.t()) ** 2).sum()  # noqa: E731
    assert (pruned == 0).float().mean() >= 0.5
    assert err(pruned) < 0.5 * err(mag)


def test_save_and_reload_keep_the_zeros(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    prune_model(tiny_model, "magnitude", 0.5, Pattern(2, 4))
    tiny_model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert measure_sparsity(again) == measure_sparsity(tiny_model)
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_model_resolution_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_calibration_windows_are_seeded_and_do_not_touch_global_random(tmp_path):
    import random

    from prunerzero.data import calibration_windows

    class CharTokenizer:
        def __call__(self, text, return_tensors=None):
            class Out:
                input_ids = torch.tensor([[ord(c) % 128 for c in text]])
            return Out()

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    random.seed(5)
    state = random.getstate()
    a = calibration_windows(CharTokenizer(), str(text), 3, 16, seed=0)
    assert random.getstate() == state
    b = calibration_windows(CharTokenizer(), str(text), 3, 16, seed=0)
    assert torch.equal(a, b) and a.shape == (3, 16)
    rng = random.Random(0)
    n = len(("hello world " * 200).splitlines(keepends=True)[0])
    first = rng.randint(0, n - 16 - 1)
    assert a[0].tolist() == [ord(c) % 128 for c in ("hello world " * 200)[first:first + 16]]
    with pytest.raises(UserError, match="too short"):
        calibration_windows(CharTokenizer(), str(text), 1, 100_000, seed=0)


def test_wikitext_rows_follow_the_datasets_builder():
    from prunerzero.data import find_data_file, text_rows

    if find_data_file("wikitext-2/wiki.test.raw") is None:
        pytest.fail("WikiText-2 test file not found; set PRUNERZERO_DATA to the shared data folder")
    rows = text_rows("wikitext2", "test")
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_cli_bad_input_gives_one_line_errors(tmp_path, capsys):
    from prunerzero.cli import main

    bad_tree = tmp_path / "bad.json"
    bad_tree.write_text(json.dumps({"data": "mul", "left": {"data": "W"}, "right": {"data": "foo"}}))
    cases = [
        (["prune", "--method", "tree", "--tree", str(bad_tree)], "'foo' at root.right"),
        (["prune", "--method", "magnitude", "--sparsity", "1.5"], "outside (0, 1)"),
        (["prune", "--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.6"], "prunes exactly 0.5"),
        (["prune", "--method", "magnitude", "--model", str(tmp_path / "missing")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.integration
def test_real_model_prune_and_perplexity_protocol(smollm2, tmp_path):
    """SmolLM2-135M on a small budget: the perplexity protocol, and pruning that behaves as expected."""
    import math

    import torch.nn.functional as F

    from prunerzero.data import calibration_windows, eval_tokens
    from prunerzero.perplexity import perplexity

    model, tokenizer, _ = smollm2
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = eval_tokens(tokenizer)
    assert tokens.numel() > 290_000  # the whole WikiText-2 test split, rows joined with "\n\n"
    seqlen = 128
    ppl, n = perplexity(model, tokens, seqlen, max_windows=3, progress=False)
    assert n == 3 * seqlen
    losses = []
    with torch.no_grad():
        for i in range(3):
            ids = tokens[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            losses.append(F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item())
    assert math.isclose(ppl, math.exp(sum(losses) / 3), rel_tol=1e-6)
    windows = calibration_windows(tokenizer, "wikitext2", 2, seqlen, seed=0)
    results = {}
    try:
        for method in ("magnitude", "wanda", "ria"):
            model.load_state_dict(dense)
            report = prune_model(model, method, 0.5, Pattern(), windows=windows)
            assert abs(report.sparsity_actual - 0.5) < 1e-3
            results[method] = perplexity(model, tokens, seqlen, max_windows=3, progress=False)[0]
    finally:
        model.load_state_dict(dense)
    assert ppl < results["wanda"] < results["magnitude"] < 1e5, (ppl, results)
    assert ppl < results["ria"] < results["magnitude"], results


def test_sliced_head_loss_equals_the_full_logits_loss():
    import torch.nn.functional as F

    from prunerzero.perplexity import LOSS_CHUNK, window_loss
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * LOSS_CHUNK + 17))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        full = float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
        assert window_loss(model, ids) == pytest.approx(full, rel=1e-6)


def test_batched_windows_give_the_per_window_losses():
    from prunerzero.perplexity import window_losses
    from tests.conftest import tiny_llama

    model = tiny_llama()
    tokens = torch.randint(0, model.config.vocab_size, (5 * 40 + 7,))
    one = window_losses(model, tokens, 40, progress=False)
    batched = window_losses(model, tokens, 40, progress=False, windows_per_forward=3)
    assert len(one) == 5 and batched == pytest.approx(one, rel=1e-5)


def test_mapped_statistics_equal_the_file_and_never_write_it(tmp_path):
    from safetensors.torch import load_file

    from prunerzero.pruning.stats import load_tensors_mapped

    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3).double(), "c": torch.randn(2, 2).half()}
    path = tmp_path / "s.safetensors"
    save_tensors_atomic(tensors, path)
    mapped = load_tensors_mapped(path)
    assert set(mapped) == set(tensors) and all(torch.equal(mapped[k], tensors[k]) for k in tensors)
    assert all(mapped[k].dtype == tensors[k].dtype for k in tensors)
    mapped["a"].zero_()  # copy-on-write: the file keeps its values
    assert torch.equal(load_file(str(path))["a"], tensors["a"])


def test_tensor_file_reads_each_tensor_from_the_file(tmp_path):
    from prunerzero.pruning.stats import TensorFile

    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3).double(), "c": torch.randn(2, 2).half(), "d": torch.randn(7, 5)}
    path = tmp_path / "s.safetensors"
    save_tensors_atomic(tensors, path)
    file = TensorFile(path)
    assert set(file) == set(tensors) and len(file) == 4 and file.shape("a") == (5, 7)
    assert all(torch.equal(file[k], tensors[k]) and file[k].dtype == tensors[k].dtype for k in tensors)
    file["a"].zero_()  # a fresh copy each time: the next lookup reads the file again
    assert torch.equal(file["a"], tensors["a"])
    reused = TensorFile(path, reuse_buffers=True)
    a = reused["a"]
    assert torch.equal(reused["d"], tensors["d"])  # same size: the buffer of "a" now holds "d"
    assert a.data_ptr() == reused["d"].data_ptr() and torch.equal(reused["a"], tensors["a"])
    one = tmp_path / "one.safetensors"
    save_tensors_atomic({"a": tensors["a"]}, one)
    one.write_bytes(one.read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated at tensor a"):
        TensorFile(one)["a"]


def test_streamed_gradients_are_checked_and_fall_back_to_memory(tiny_model, windows, tmp_path):
    from prunerzero.pruning.stats import TensorFile, stream_gradients

    grads = compute_gradients(tiny_model, windows[:1])
    good = tmp_path / "g.safetensors"
    save_tensors_atomic(grads, good)
    streamed = stream_gradients(good, tiny_model)
    assert isinstance(streamed, TensorFile) and all(torch.equal(streamed[k], grads[k]) for k in grads)
    first = next(iter(grads))
    grads[first][0, 0] = float("nan")  # a file to repair: loaded into memory, made finite
    bad = tmp_path / "nan.safetensors"
    save_tensors_atomic(grads, bad)
    repaired = stream_gradients(bad, tiny_model)
    assert not isinstance(repaired, TensorFile) and bool(torch.isfinite(repaired[first]).all())


def test_selection_on_layer_sized_scores_equals_the_stable_sort():
    # bf16-rounded scores tie at the threshold; non-negative scores are selected on their bit
    # patterns, where -0.0 reads as the smallest int: signed zeros must still tie with +0.0
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(301, 576), (64, 1536)]:
        magnitudes = torch.randn(rows, cols, generator=gen).abs().to(torch.bfloat16).float()
        zeros = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -0.0, 0.0)
        signed_zeros = torch.where(torch.rand(rows, cols, generator=gen) < 0.6, zeros, magnitudes)
        for scores in (magnitudes, -magnitudes, signed_zeros, magnitudes - 1):
            for sparsity in (0.5, 0.7):
                k = int(cols * sparsity)
                ref = torch.zeros(rows, cols, dtype=torch.bool)
                ref.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :k], True)
                assert torch.equal(prune_mask(scores, sparsity), ref)
