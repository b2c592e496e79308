"""The max fold's float32 GEMM on a torch device (a GPU), with the same exact recheck as on the CPU.

A complete farthest-first ranking computes about N^2 / 2 products (10^7 images: 5 x 10^13 at d = 128),
so its time is the fold's GEMM. Here the candidates' vectors live on the device; each fold multiplies
them with the new picks there and brings back only the few entries that can raise a score
(:func:`raises`, the rule of :func:`~.sims.max_raises`), which the host recomputes in the shared
exact arithmetic. A float32 product on the device is within the same ``gamma_d |x| |y|`` of the exact
one whatever its summation order, provided TF32 is off, so the rankings equal the CPU's bit for bit.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "cuda")


def torch_device(device: str):
    """The torch module, after checking ``device`` can run (TF32 off: the error bound needs full float32)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("select device cuda asked for, but torch sees no GPU here: use --select-device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


class DeviceFold:
    """A shard's candidate vectors on ``device``; :meth:`raises` is the fold's GEMM and candidate filter."""

    def __init__(self, vectors: np.ndarray, norms: np.ndarray, device: str):
        self.torch = torch_device(device)
        self.device = device
        self.all = self.torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device)
        self.all_norms = self.torch.from_numpy(np.asarray(norms, np.float64)).to(device)
        self.active, self.norms = self.all, self.all_norms

    def reset(self, positions: np.ndarray, whole: bool) -> None:
        """The GEMM operand becomes the rows at ``positions`` (``whole``: every row, in order)."""
        if whole:
            self.active, self.norms = self.all, self.all_norms
        else:
            at = self.torch.from_numpy(np.asarray(positions, np.int64)).to(self.device)
            self.active, self.norms = self.all[at], self.all_norms[at]

    def picks(self, vectors: np.ndarray):
        """The new picks' vectors on the device (once per fold)."""
        return self.torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(self.device)

    def raises(self, start: int, stop: int, picks, scores: np.ndarray, err: float) -> tuple[np.ndarray, np.ndarray]:
        """Entries of ``active[start:stop] @ picks.T`` that can raise a row's max: (rows from ``start``, pick columns).

        The rule of :func:`~.sims.max_raises`: a row whose float32 best can exceed its score less the
        error bound, its best column, and every runner-up within twice the bound of that best.
        """
        torch = self.torch
        g = self.active[start:stop] @ picks.T
        bound = self.norms[start:stop] * err
        floor = torch.from_numpy(np.asarray(scores, np.float64)).to(self.device) - bound
        top, best = g.max(dim=1)
        flagged = torch.nonzero(top.double() > floor).flatten()
        if len(flagged) == 0:
            empty = np.empty(0, np.int64)
            return empty, empty
        sub = g[flagged]
        cols = best[flagged]
        at = torch.arange(len(flagged), device=self.device)
        lower = torch.maximum(floor[flagged], top[flagged].double() - 2.0 * bound[flagged])
        sub[at, cols] = -float("inf")
        close = torch.nonzero(sub.max(dim=1).values.double() >= lower).flatten()
        hit, col = torch.nonzero(sub[close].double() >= lower[close, None], as_tuple=True)
        rows = torch.cat([flagged, flagged[close[hit]]])
        return rows.cpu().numpy(), torch.cat([cols, col]).cpu().numpy()
