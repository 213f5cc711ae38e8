"""Per-weight statistics: X (activation norms) and G (gradient l2 norms), with an on-disk cache.

``G`` follows the Pruner-Zero / GBLM-Pruner gradient computation: one backward pass of the
language-modelling loss per calibration window, gradients scaled by 100, squares accumulated,
square root at the end. It is the expensive statistic, so it is cached as safetensors under a key
made of everything it depends on (model, data, split, seed, nsamples, seqlen, scale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from prunerzero.errors import UserError
from prunerzero.files import write_with
from prunerzero.models import model_device, prunable_linears
from prunerzero.primitives.registry import finite
from prunerzero.pruning.layerwise import iterate_blocks
from prunerzero.pruning.obs import inverse_hessian_factor

log = logging.getLogger(__name__)

GRADIENT_SCALE = 100.0


def compute_gradients(model: nn.Module, windows: torch.Tensor, scale: float = GRADIENT_SCALE) -> dict[str, torch.Tensor]:
    """Per-weight l2 norm over the windows of ``scale * dLoss/dW`` for every prunable linear layer."""
    linears = prunable_linears(model)
    device = model_device(model)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in linears.values():
        lin.weight.requires_grad_(True)
    sums = {n: torch.zeros_like(l.weight, dtype=torch.float32) for n, l in linears.items()}
    start = time.perf_counter()
    try:
        for row in tqdm(windows, desc="gradients", unit="window"):
            for lin in linears.values():
                lin.weight.grad = None
            ids = row.unsqueeze(0).to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for n, lin in linears.items():
                sums[n] += (lin.weight.grad.float() * scale) ** 2
    finally:
        for lin in linears.values():
            lin.weight.grad = None
        for p, flag in saved.items():
            p.requires_grad_(flag)
    log.info("gradients of %d windows in %.1f s", len(windows), time.perf_counter() - start)
    # Terminals must be finite (bounded operators rely on it); a sum of squares can overflow.
    return {n: finite(s.sqrt_()) for n, s in sums.items()}


def collect_activation_norms(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """X of every prunable linear layer from the dense model in one pass (the "once per run" mode)."""
    return collect_dense_statistics(model, windows)[0]


def collect_dense_statistics(model: nn.Module, windows: torch.Tensor,
                             obs_factors: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(X, OBS factors) of every prunable linear layer from the dense model, in one pass.

    ``obs_factors``: also each layer's SparseGPT inverse-Hessian factor (``NAME``) and its dead
    inputs (``NAME.dead``, uint8), what the OBS update reads (:func:`obs.inverse_hessian_factor`):
    with ``stats_mode: once`` a run computes them here once and every candidate reuses them."""
    names = {id(m): n for n, m in model.named_modules()}
    acts: dict[str, torch.Tensor] = {}
    factors: dict[str, torch.Tensor] = {}

    def keep(_i: int, linears: dict, stats: dict) -> bool:
        for short, lin in linears.items():
            name = names[id(lin)]
            acts[name] = stats[short].scaler_row.clone()
            if obs_factors:
                factor, dead = inverse_hessian_factor(stats[short].hessian, name, stats[short].nsamples)
                factors[name], factors[name + ".dead"] = factor, dead.to(torch.uint8)
        return False

    bar = tqdm(total=None, desc="activations" + (" and Hessians" if obs_factors else ""), unit="block")
    iterate_blocks(model, windows, keep, hessian=obs_factors,
                   progress=lambda i, n: (setattr(bar, "total", n), bar.update(1)))
    bar.close()
    return acts, factors


def cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written through a temporary file (removed on any failure, a full disk included)."""
    cpu = {k: v.contiguous().cpu() for k, v in tensors.items()}
    write_with(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _safetensors_entries(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, {name: header entry}) of a safetensors file."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    return 8 + header_len, {k: v for k, v in header.items() if k != "__metadata__"}


def load_tensors_mapped(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file as CPU tensors backed by a private memory map of the file.

    The pages are the page cache's: every process on a machine that maps the same statistics
    (each Ray worker) shares one physical copy, and nothing is read until it is used. Writing a
    tensor copies the touched pages (MAP_PRIVATE); the file is never changed. Falls back to
    ``load_file`` for dtypes or layouts a plain view cannot express."""
    path = Path(path)
    base, entries = _safetensors_entries(path)
    if any(v["dtype"] not in _SAFETENSORS_DTYPES or (base + v["data_offsets"][0]) % _SAFETENSORS_DTYPES[v["dtype"]].itemsize
           for v in entries.values()):
        return load_file(str(path))
    storage = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)
    out = {}
    for name, v in entries.items():
        dtype = _SAFETENSORS_DTYPES[v["dtype"]]
        out[name] = torch.empty(0, dtype=dtype).set_(storage, (base + v["data_offsets"][0]) // dtype.itemsize, v["shape"])
    return out


class TensorFile(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from the file when it is looked up.

    Nothing stays in the process: a caller that uses one layer's tensor and drops it holds one
    layer at a time. (A memory map would count every page it ever touched as this process's
    resident memory.) The file's pages live in the page cache, shared by every process on the
    machine. With ``reuse_buffers`` a lookup reads into one buffer per tensor size, so a tensor
    is valid only until the next lookup of one of the same size by the same thread; reading costs
    no new pages then, and is about free next to any use of the tensor."""

    def __init__(self, path: str | Path, reuse_buffers: bool = False):
        self.path = Path(path)
        self._base, self._entries = _safetensors_entries(self.path)
        unknown = sorted({v["dtype"] for v in self._entries.values()} - set(_SAFETENSORS_DTYPES))
        if unknown:
            raise UserError(f"{self.path}: dtype {unknown[0]} is not supported in a statistics file")
        self._reuse_buffers = reuse_buffers
        self._local = threading.local()  # buffers are per thread: layers may be scored side by side

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self._entries[name]
        start, end = v["data_offsets"]
        size = end - start
        buffers = self._thread_buffers()
        raw = None if buffers is None else buffers.get(size)
        if raw is None:
            raw = torch.empty(size, dtype=torch.uint8)
            if buffers is not None:
                buffers[size] = raw
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(raw.numpy()) != size:
                raise UserError(f"{self.path} is truncated at tensor {name}; delete it and it is computed again")
        return raw.view(_SAFETENSORS_DTYPES[v["dtype"]]).reshape(v["shape"])

    def _thread_buffers(self) -> dict[int, torch.Tensor] | None:
        if not self._reuse_buffers:
            return None
        if not hasattr(self._local, "buffers"):
            self._local.buffers = {}
        return self._local.buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def finite_checked(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it holds no NaN/Inf (so a mapped tensor stays shared), else a finite copy."""
    return t if bool(torch.isfinite(t).all()) else finite(t)


_REFERENCE_KEY = re.compile(r"^(?P<name>.+)_layer_(?P<i>\d+)$")


def load_gradients(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load a gradient file (ours: safetensors; or the reference code's ``.pth`` dict keyed
    ``self_attn.q_proj_layer_0``) and check it against the model's layers and shapes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gradient file {path} does not exist; compute one with `prunerzero gradients`")
    try:
        if path.suffix == ".safetensors":
            grads = load_tensors_mapped(path)
        else:
            grads = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read gradient file {path}: {str(e).splitlines()[0][:200]}") from None
    linears = prunable_linears(model)
    prefix = next(iter(linears)).split(".layers.")[0]
    renamed = {}
    for k, v in grads.items():
        m = _REFERENCE_KEY.match(k)
        renamed[f"{prefix}.layers.{m['i']}.{m['name']}" if m and k not in linears else k] = v
    missing = [n for n in linears if n not in renamed]
    if missing:
        raise UserError(f"gradient file {path} has no entry for layer {missing[0]} ({len(missing)} missing); was it computed for this model?")
    for n, lin in linears.items():
        if tuple(renamed[n].shape) != tuple(lin.weight.shape):
            raise UserError(
                f"gradient file {path}: layer {n} has shape {tuple(renamed[n].shape)} but the model's "
                f"weight is {tuple(lin.weight.shape)}; the file was computed for another model"
            )
    device = model_device(model)
    return {n: finite_checked(renamed[n].to(device=device, dtype=torch.float32)) for n in linears}


def stream_gradients(path: str | Path, model: nn.Module) -> Mapping[str, torch.Tensor]:
    """G of a CPU model read from its file one layer at a time, so a process that evaluates many
    candidates never holds all of G. A layer's G is valid until the next lookup of a layer of the
    same shape (buffers are reused): use it and drop it, as scores do. The file is checked once,
    like :func:`load_gradients` does; files that need renaming or repair, and models on an
    accelerator, get :func:`load_gradients` instead."""
    path = Path(path)
    linears = prunable_linears(model)
    if path.suffix == ".safetensors" and path.is_file() and model_device(model).type == "cpu":
        file = TensorFile(path, reuse_buffers=True)
        if (set(file) == set(linears) and all(file.shape(n) == tuple(lin.weight.shape) for n, lin in linears.items())
                and all(bool(torch.isfinite(file[n]).all()) for n in file)):
            return file
    return load_gradients(path, model)


def cached_gradients(
    model: nn.Module, windows: torch.Tensor, cache_dir: Path, key_parts: dict[str, object], scale: float = GRADIENT_SCALE,
    also: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients from the cache when the key matches, else computed and stored.

    ``also``: a second cache folder under the same file name, read when ``cache_dir`` lacks the
    file and given a copy of what is computed (a hard link where the file system allows)."""
    name = f"gradients-{cache_key(kind='gradients', scale=scale, **key_parts)}.safetensors"
    path = Path(cache_dir) / name
    if not path.is_file() and also is not None and (Path(also) / name).is_file():
        link_or_copy(Path(also) / name, path)
        log.info("gradients from cache %s, linked into %s", Path(also) / name, cache_dir)
    if path.is_file():
        log.info("gradients from cache %s", path)
        return load_gradients(path, model)
    grads = compute_gradients(model, windows, scale)
    save_tensors_atomic(grads, path, metadata={k: str(v) for k, v in key_parts.items()})
    log.info("gradients cached at %s", path)
    if also is not None and not (Path(also) / name).exists():
        link_or_copy(path, Path(also) / name)
    return grads


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content, atomically: a hard link, or a copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
