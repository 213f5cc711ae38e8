"""Shared fixtures: a tiny random LLaMA built in memory, and the real SmolLM2 for integration tests."""

from __future__ import annotations

import os

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


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def windows():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (first load converts the GGUF file and caches it; later loads take ~1 s)."""
    from prunerzero.pruning.models import load_model

    return load_model("smollm2-135m", "cpu")
