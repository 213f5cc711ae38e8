"""The one mask routine shared by every method.

A mask is a boolean tensor, True where a weight is pruned (set to zero). The comparison group is
explicit: ``row`` ranks the scores of each output row against each other (Wanda's and
Pruner-Zero's choice), ``tensor`` ranks the whole tensor at once (SparseGPT's choice inside a
column block). N:M prunes the N lowest scores of each group of M consecutive inputs of a row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from prunerzero.errors import UserError


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (n = m = 0) or ``N:M``."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = str(text).strip()
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            n, m = int(parts[0]), int(parts[1])
            if 0 < n < m:
                return cls(n, m)
        raise UserError(f"pattern {text!r} is not understood; use 'unstructured', '2:4' or '4:8' (N:M with 0 < N < M)")


def check_sparsity(sparsity: float, pattern: Pattern) -> float:
    """Validate a target sparsity against a pattern (N:M fixes the sparsity to N/M)."""
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"sparsity {sparsity!r} is not a number; give a fraction such as 0.5") from None
    if not 0.0 < sparsity < 1.0:
        raise UserError(f"sparsity {sparsity} is outside (0, 1); give a fraction such as 0.5")
    if pattern.structured and abs(sparsity - pattern.n / pattern.m) > 1e-9:
        raise UserError(
            f"pattern {pattern} prunes exactly {pattern.n / pattern.m:g} of the weights, but sparsity "
            f"{sparsity:g} was asked; use --sparsity {pattern.n / pattern.m:g} or --pattern unstructured"
        )
    return sparsity


def _lowest_per_row_numpy(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k lowest scores of each row of a float array, ties to the lower column index.

    numpy's introselect finds each row's k-th smallest without sorting (about 3x faster than
    torch.kthvalue on CPU: 0.29 s against 0.90 s over the layers of SmolLM2-135M)."""
    # Non-negative float32 scores order exactly as their bit patterns read as int32 (-0.0 aside,
    # which reads as the smallest int but yields the same k-th value, 0.0), and numpy selects
    # among int32 about 20% faster than among floats, whose comparisons must place NaN.
    keys = scores.view(np.int32) if scores.dtype == np.float32 and scores.min() >= 0 else scores
    kth = np.partition(keys, k - 1, axis=1)[:, k - 1 : k].view(scores.dtype)
    at_most = scores <= kth
    # Every row holds at least k scores <= its k-th smallest, so a total of exactly rows * k
    # means no ties to repair; the total is 8x cheaper to count than the per-row counts.
    if np.count_nonzero(at_most) == at_most.shape[0] * k:
        return at_most
    surplus = np.count_nonzero(at_most, axis=1) - k
    # Ties at the threshold: as the stable sort does, keep pruning the tied entries from the left
    # until the row has k. Only the tied entries are visited, in row-major order, so each one's
    # ordinal within its row is its position minus the position of its row's first tie.
    # (flatnonzero and divmod: 2-D nonzero costs six times as much.)
    tie_row, tie_col = np.divmod(np.flatnonzero(scores == kth), scores.shape[1])
    ties_per_row = np.bincount(tie_row, minlength=len(scores))
    first_tie = np.cumsum(ties_per_row) - ties_per_row
    ordinal = np.arange(len(tie_row)) - first_tie[tie_row]
    spare = ordinal >= (ties_per_row - surplus)[tie_row]  # never true in a row without surplus
    at_most[tie_row[spare], tie_col[spare]] = False
    return at_most


def _lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest scores of each row, ties broken towards the lower column index.

    Exactly the first k entries of a stable sort (the reference), found with a selection
    instead of a full sort, which is the costly step of a fitness evaluation."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.device.type != "cpu":
        kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
        at_most = scores <= kth
        surplus = at_most.sum(1, keepdim=True) - k
        if bool(surplus.any()):
            tied = scores == kth
            at_most &= ~(tied & (tied.cumsum(1) > tied.sum(1, keepdim=True) - surplus))
        return at_most
    # (Splitting the rows over two threads was measured slower on a 2-core CPU inside a fitness
    # evaluation: 0.756 s against 0.698 s for the masks of mul(W, sqrt(X)) on SmolLM2-135M.)
    return torch.from_numpy(_lowest_per_row_numpy(scores.detach().numpy(), k))


def prune_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: Pattern = Pattern(),
    group: Literal["row", "tensor"] = "row",
) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest-scoring weights of a 2-D score tensor.

    ``row``: in each row the ``int(in * sparsity)`` lowest scores, stable sort (ties go to the
    lower column index), exactly as the reference Wanda code. ``tensor``: every score at or below
    the ``int(numel * sparsity)``-th smallest, as the reference SparseGPT code.
    N:M ignores ``group``: in each row and each group of M columns, the N lowest scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(scores.shape)}")
    scores = scores.float()
    rows, cols = scores.shape
    if pattern.structured:
        if cols % pattern.m:
            raise UserError(f"a layer with {cols} inputs cannot be split into groups of {pattern.m}")
        grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(grouped, pattern.n, dim=-1, largest=False).indices
        mask = torch.zeros_like(scores, dtype=torch.bool)
        return mask.reshape(rows, cols // pattern.m, pattern.m).scatter_(-1, idx, True).reshape(rows, cols)
    if group == "row":
        return _lowest_per_row(scores, int(cols * sparsity))
    if group == "tensor":
        # the (k+1)-th smallest, as the reference's sort()[k]; kthvalue finds the same value in O(n)
        thresh = torch.kthvalue(scores.flatten(), int(scores.numel() * sparsity) + 1).values
        return scores <= thresh
    raise ValueError(f"unknown comparison group {group!r}")


def prune_count(scores: torch.Tensor, count: int, group: Literal["row", "tensor"] = "row") -> torch.Tensor:
    """Mask of exactly ``count`` lowest scores (an allocation's layer count). ``row``: spread over the
    rows as evenly as possible, the first ``count % rows`` rows pruning one more, each row ranking its
    own weights; ``tensor``: the ``count`` lowest of the whole layer (stable order)."""
    scores = scores.float()
    rows, cols = scores.shape
    if not 0 <= count <= scores.numel():
        raise ValueError(f"count {count} is outside [0, {scores.numel()}]")
    if group == "tensor":
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[torch.argsort(scores.flatten(), stable=True)[:count]] = True
        return mask.reshape(rows, cols)
    k, extra = divmod(count, rows)
    if extra == 0:
        return _lowest_per_row(scores, k)
    return torch.cat([_lowest_per_row(scores[:extra].contiguous(), k + 1), _lowest_per_row(scores[extra:].contiguous(), k)])


@dataclass(frozen=True)
class PackedMask:
    """One layer's mask as bits (see :class:`PackedMasks`)."""

    bits: np.ndarray
    shape: torch.Size
    device: torch.device

    @classmethod
    def of(cls, mask: torch.Tensor) -> "PackedMask":
        return cls(np.packbits(mask.cpu().numpy()), mask.shape, mask.device)


class PackedMasks(Mapping):
    """A model's masks kept as bits, 8x smaller than bool tensors; a layer's bool mask is unpacked
    when it is looked up (by the masked forward, one layer at a time)."""

    def __init__(self) -> None:
        self._bits: dict[str, np.ndarray] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._devices: dict[str, torch.device] = {}

    @classmethod
    def of(cls, masks: Mapping[str, torch.Tensor]) -> "PackedMasks":
        packed = cls()
        for name, mask in masks.items():
            packed.add(name, mask)
        return packed

    def add(self, name: str, mask: torch.Tensor | PackedMask) -> None:
        packed = mask if isinstance(mask, PackedMask) else PackedMask.of(mask)
        self._bits[name], self._shapes[name], self._devices[name] = packed.bits, packed.shape, packed.device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._unpack(name, self._bits[name])

    def keep(self, name: str) -> torch.Tensor:
        """The complement of a layer's mask (True = kept), inverted while still packed: 8x less
        work than inverting the unpacked mask."""
        return self._unpack(name, np.invert(self._bits[name]))

    def _unpack(self, name: str, bits: np.ndarray) -> torch.Tensor:
        shape = self._shapes[name]
        flat = np.unpackbits(bits, count=math.prod(shape))
        return torch.from_numpy(flat).view(torch.bool).reshape(shape).to(self._devices[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def key(self) -> str:
        """Hash of the whole mask set: equal keys mean equal pruned models, so equal fitness."""
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self._bits):
            h.update(name.encode())
            h.update(self._bits[name].tobytes())
        return h.hexdigest()
