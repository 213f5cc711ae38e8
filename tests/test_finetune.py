"""LoRA fine-tuning keeps the pruned zeros: a tiny random LLaMA, no downloads, CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from prunerzero.errors import UserError
from prunerzero.models import prunable_linears
from prunerzero.pruning.masks import Pattern
from prunerzero.pruning.prune import layer_sparsity_total, measure_sparsity, prune_model
from prunerzero.recovery.lora import (
    LoraSettings,
    base_linears,
    base_sparsity,
    finetune_lora,
    merge_and_remask,
)
from tests.conftest import VOCAB, char_tokenizer

SEQLEN = 32


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and avoids crawling on a busy, shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pruned():
    model = tiny_llama()
    prune_model(model, "magnitude", 0.5, Pattern())
    return model


def repeated_windows(n: int = 4, seed: int = 1) -> torch.Tensor:
    """A tiny, repeated dataset: the same random sequence in every window, easy to memorise."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, SEQLEN), generator=gen).repeat(n, 1)


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {name: (lin.weight == 0).clone() for name, lin in base_linears(model).items()}


def weights(model) -> dict[str, torch.Tensor]:
    return {name: lin.weight.detach().clone() for name, lin in base_linears(model).items()}


FAST = LoraSettings(rank=4, alpha=8, dropout=0.0, steps=30, lr=1e-2, seqlen=SEQLEN)


def test_training_reduces_loss_and_keeps_base_zeros(pruned):
    before_masks, before_weights = zero_masks(pruned), weights(pruned)
    sparsity = base_sparsity(pruned)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    run = finetune_lora(pruned, None, FAST, progress=False, windows=repeated_windows())
    losses = run["losses"]
    assert len(losses) == FAST.steps and run["steps"] == FAST.steps
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    peft_model = run["peft_model"]
    # Unmerged: the base weights are bitwise the pruned ones, so the zeros are exactly unchanged.
    after = weights(peft_model)
    assert after.keys() == before_weights.keys()
    for name, w in after.items():
        assert torch.equal(w, before_weights[name]), name
        assert torch.equal(w == 0, before_masks[name]), name
    assert base_sparsity(peft_model) == sparsity


def test_merge_and_remask_keeps_exact_zero_pattern(pruned):
    before_masks, before_weights = zero_masks(pruned), weights(pruned)
    run = finetune_lora(pruned, None, FAST, progress=False, windows=repeated_windows())
    merged = merge_and_remask(run["peft_model"])
    assert not hasattr(merged, "peft_config") and set(prunable_linears(merged)) == set(before_masks)
    changed = 0
    for name, lin in prunable_linears(merged).items():
        w = lin.weight.detach()
        assert torch.equal(w == 0, before_masks[name]), name
        changed += int((w[~before_masks[name]] != before_weights[name][~before_masks[name]]).sum())
    assert changed > 0  # the adapters did change the kept weights
    assert layer_sparsity_total(measure_sparsity(merged)) == layer_sparsity_total(
        {n: (int(m.sum()), m.numel()) for n, m in before_masks.items()})


def test_plain_merge_would_fill_the_zeros(pruned):
    """Why the re-masking is needed: peft's own merge writes into the pruned positions."""
    sparsity = base_sparsity(pruned)
    run = finetune_lora(pruned, None, FAST, progress=False, windows=repeated_windows())
    merged = run["peft_model"].merge_and_unload()
    assert base_sparsity(merged) < sparsity


def test_merged_model_matches_unmerged_outside_the_masks():
    """With nothing pruned, merge_and_remask is a plain merge: same logits as the unmerged adapters."""
    model = tiny_llama()
    run = finetune_lora(model, None, LoraSettings(rank=4, dropout=0.0, steps=3, lr=1e-2, seqlen=SEQLEN),
                        progress=False, windows=repeated_windows())
    ids = repeated_windows(1, seed=7)
    with torch.no_grad():
        unmerged = run["peft_model"](input_ids=ids).logits
        merged = merge_and_remask(run["peft_model"])(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_unknown_target_names_the_available_modules(pruned):
    settings = LoraSettings(targets=("q_proj", "qkv_proj"), steps=1, seqlen=SEQLEN)
    with pytest.raises(UserError) as e:
        finetune_lora(pruned, None, settings, progress=False, windows=repeated_windows())
    message = str(e.value)
    assert "qkv_proj" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    assert not any("lora_" in n for n, _ in pruned.named_modules())  # the model was not wrapped


def test_yaml_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("rank: 4\nlearning_rate: 0.001\n")
    with pytest.raises(UserError, match="learning_rate"):
        LoraSettings.from_yaml(path)


def test_yaml_values_and_precedence(tmp_path):
    from prunerzero.cli import build_parser
    from prunerzero.cli.finetune import settings_from_args

    path = tmp_path / "lora.yaml"
    path.write_text("rank: 4\nlr: 1e-3\ntargets: [q_proj, v_proj]\nsteps: 7\nbatch-size: 2\n")
    s = LoraSettings.from_yaml(path)
    assert (s.rank, s.lr, s.targets, s.steps, s.batch_size, s.alpha) == (4, 1e-3, ("q_proj", "v_proj"), 7, 2, 16)
    args = build_parser().parse_args(["finetune", "--model", "m", "--config", str(path), "--rank", "2",
                                      "--targets", "o_proj,down_proj", "--max-eval-windows", "3"])
    s = settings_from_args(args)
    # defaults < YAML < flags
    assert (s.rank, s.steps, s.targets, s.eval_windows, s.dropout) == (2, 7, ("o_proj", "down_proj"), 3, 0.05)


@pytest.mark.parametrize("text, word", [("rank: two\n", "rank"), ("- 1\n- 2\n", "mapping"), ("dropout: 1.5\n", "dropout")])
def test_yaml_bad_values(tmp_path, text, word):
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=word):
        LoraSettings.from_yaml(path)


def test_cli_end_to_end(tmp_path, pruned, capsys):
    """prunerzero finetune on a saved tiny pruned model, with local text files only."""
    from prunerzero.cli import main

    model_dir, data_dir = tmp_path / "pruned", tmp_path / "data"
    pruned.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    (data_dir / "wikitext-2").mkdir(parents=True)
    line = " The quick brown fox jumps over the lazy dog . \n"
    (data_dir / "wikitext-2" / "wiki.valid.raw").write_text(line * 40)
    (data_dir / "wikitext-2" / "wiki.test.raw").write_text(line * 20)
    sparsity = base_sparsity(pruned)
    out = tmp_path / "out.json"
    rc = main(["finetune", "--model", str(model_dir), "--device", "cpu", "--data-dir", str(data_dir),
               "--steps", "4", "--seqlen", "32", "--rank", "2", "--lr", "1e-2", "--eval-seqlen", "64",
               "--max-eval-windows", "2", "--merge", "--save", str(tmp_path / "merged"), "--json", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 4 and result["steps"] == 4 and result["eval_tokens"] == 128
    for key in ("sparsity_before", "sparsity_after", "sparsity_after_merge"):
        assert summary[key] == pytest.approx(sparsity, abs=0), key
    assert summary["ppl_before"] > 0 and summary["ppl_after"] > 0 and summary["ppl_after_merge"] > 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_cli_unknown_target_is_one_line(tmp_path, pruned, capsys):
    from prunerzero.cli import main

    pruned.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    data_dir = tmp_path / "data" / "wikitext-2"
    data_dir.mkdir(parents=True)
    (data_dir / "wiki.test.raw").write_text("abc def\n" * 40)
    (data_dir / "wiki.valid.raw").write_text("abc def\n" * 40)
    rc = main(["finetune", "--model", str(tmp_path / "m"), "--device", "cpu", "--data-dir", str(tmp_path / "data"),
               "--targets", "c_attn", "--eval-seqlen", "32", "--max-eval-windows", "1", "--seqlen", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("prunerzero: error:") and "c_attn" in err[-1] and "gate_proj" in err[-1]
