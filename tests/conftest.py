"""Shared fixtures: a tiny random LLaMA built in memory, and the real SmolLM2 for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(vocab_size: int = 128, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The tests' statistics go to a cache of their own: tiny models carry made-up fingerprints
    ("tiny-test") that must never meet a user's cached G. Converted models (SmolLM2's GGUF file,
    converted once) are read from and written to the user's cache, as a user's run would."""
    user = Path(os.environ.get("PRUNERZERO_CACHE", Path.home() / ".cache" / "prunerzero"))
    (user / "models").mkdir(parents=True, exist_ok=True)
    private = tmp_path_factory.mktemp("cache")
    (private / "models").symlink_to(user / "models", target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("PRUNERZERO_CACHE", str(private))
    yield private
    patch.undo()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def windows():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (first load converts the GGUF file and caches it; later loads take ~1 s)."""
    from prunerzero.models import load_model

    return load_model("smollm2-135m", "cpu")


VOCAB = 128


def char_tokenizer():
    """A character-level tokenizer (printable ASCII), small enough for the tiny models."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>"] + list(string.printable))}
    assert len(vocab) <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>")


def tiny_model_folder(folder, seed: int = 0):
    """A tiny random LLaMA and the character tokenizer saved as a model folder (``--model FOLDER``)."""
    tiny_llama(seed=seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def local_data(folder, lines: int = 60):
    """WikiText-2 (validation, test) and C4 (train, validation) files with the layout of ../shared/data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    line = " The quick brown fox jumps over the lazy dog . \n"
    (folder / "wikitext-2").mkdir(parents=True)
    (folder / "wikitext-2" / "wiki.valid.raw").write_text(line * lines)
    (folder / "wikitext-2" / "wiki.test.raw").write_text(" A lazy dog sleeps ; the fox runs away . \n" * lines)
    (folder / "c4").mkdir()
    (folder / "c4" / "c4_sample.jsonl").write_text("".join('{"text": "%s"}\n' % line.strip() for _ in range(lines)))
    pq.write_table(pa.table({"text": [f"Document {i}: the dog and the fox." for i in range(lines)]}),
                   folder / "c4" / "c4_validation_2k.parquet")
    return folder


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A tiny model folder and a local data folder, made once per test module (for command-line tests)."""
    root = tmp_path_factory.mktemp("md")
    return str(tiny_model_folder(root / "model")), str(local_data(root / "data"))
