"""One layer iterator for every method: calibration inputs flow through the decoder block by block.

The reference code (Wanda, SparseGPT, Pruner-Zero) catches the inputs of the first block by
raising an exception from a wrapper module; here the blocks are swapped for a recorder for the
duration of one call, inside a context manager that always puts them back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from prunerzero.models import decoder_layers, linear_layers, model_device


@dataclass
class BlockInputs:
    """The hidden states entering a block, one tensor (1, seq, hidden) per calibration window,
    and the keyword arguments the model passes to every block (position embeddings, masks)."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.hidden.append(hidden_states.detach())
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_value", "past_key_values", "use_cache")}
        return hidden_states


@contextmanager
def _blocks_replaced_by(model: nn.Module, recorder: nn.Module) -> Iterator[None]:
    layers = decoder_layers(model)
    owner = model.model.decoder if hasattr(model.model, "decoder") and model.model.decoder.layers is layers else model.model
    owner.layers = nn.ModuleList([recorder])
    try:
        yield
    finally:
        owner.layers = layers


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor) -> BlockInputs:
    """Run the embeddings (not the blocks, not the head) on each window and keep what enters block 0."""
    recorder = _Recorder()
    device = model_device(model)
    inner = model.model.decoder if hasattr(model.model, "decoder") else model.model
    with _blocks_replaced_by(model, recorder):
        for row in windows:
            inner(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    return BlockInputs(recorder.hidden, recorder.kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outs = []
    for h in inputs.hidden:
        out = block(h, **inputs.kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` on every forward of each module; hooks are always removed."""
    handles = [
        m.register_forward_hook(lambda _m, inp, _out, name=name: fn(name, inp[0].detach()))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class InputStatistics:
    """Accumulates, for one linear layer, Wanda's ``scaler_row`` (X) and optionally SparseGPT's
    Hessian ``2/n * sum x x^T``, with the running-mean updates of the reference code."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool = False):
        self.nsamples = 0
        self.scaler_row = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=torch.float32) if hessian else None

    def add(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t().float()  # (in, tokens)
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        if self.hessian is not None:
            self.hessian *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.linalg.vector_norm(x, dim=1) ** 2 / self.nsamples
        if self.hessian is not None:
            xs = (2 / self.nsamples) ** 0.5 * x
            self.hessian += xs @ xs.t()


def iterate_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    on_block: Callable[[int, dict[str, nn.Linear], dict[str, InputStatistics]], bool],
    hessian: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Feed the calibration windows through the blocks one at a time.

    For each block: collect the input statistics of its linear layers, call ``on_block`` (which may
    prune the block and returns True if it changed it), then compute the block's outputs, which
    are the next block's inputs (recomputed after pruning, as in the reference code).
    """
    inputs = capture_block_inputs(model, windows)
    device = model_device(model)
    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        linears = linear_layers(block)
        stats = {n: InputStatistics(l.in_features, device, hessian) for n, l in linears.items()}
        with input_hooks(linears, lambda name, x: stats[name].add(x)):
            outs = run_block(block, inputs)
        if on_block(i, linears, stats):
            outs = run_block(block, inputs)
        inputs = BlockInputs(outs, inputs.kwargs)
        if progress:
            progress(i + 1, len(layers))
