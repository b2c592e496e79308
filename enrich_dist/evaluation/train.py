"""Train one seeded model on one subset and score it on the test split (runs inside a Ray task)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .metrics import auc, jaccard_counts, mean_jaccard
from .models import build_model

EVAL_BATCH = 256
LBFGS_ITERATIONS = 100


@dataclass(frozen=True)
class TrainSpec:
    """How one model is trained: network, input size, schedule, seed and device."""

    model: str
    image_size: int
    width: int | None = None
    epochs: int = 5
    min_steps: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """uint8 images to float tensors (N, 1, S, S) scaled by the training subset's mean and std."""
    x = torch.from_numpy(train).float().div_(255.0)
    mean, std = float(x.mean()), float(x.std()) or 1.0
    out = [x]
    out += [torch.from_numpy(o).float().div_(255.0) for o in others]
    return [((t - mean) / std).unsqueeze(1) for t in out]


def _epochs(n: int, spec: TrainSpec) -> int:
    """Epochs to run: ``spec.epochs``, raised so that small subsets still get ``min_steps`` updates."""
    steps_per_epoch = max(1, math.ceil(n / spec.batch_size))
    return max(spec.epochs, math.ceil(spec.min_steps / steps_per_epoch))


def _fit_minibatch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> None:
    """Adam on shuffled mini-batches with cross-entropy (per pixel when ``y`` is a label map)."""
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.Adam(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(_epochs(len(x), spec)):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), spec.batch_size):
            idx = order[start : start + spec.batch_size]
            if len(idx) < 2 < len(x):  # batch norm needs two samples; the image comes back next epoch
                continue
            xb, yb = x[idx].to(spec.device), y[idx].to(spec.device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()


def _fit_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> None:
    """Full-batch L-BFGS on L2-regularised cross-entropy (the logistic-regression probe)."""
    x, y = x.to(spec.device), y.to(spec.device)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) + spec.weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    model.train()
    opt.step(closure)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    """Softmax outputs in batches, on the CPU."""
    model.eval()
    parts = [
        torch.softmax(model(x[i : i + EVAL_BATCH].to(device)), dim=1).cpu()
        for i in range(0, len(x), EVAL_BATCH)
    ]
    return torch.cat(parts)


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    spec: TrainSpec,
) -> float:
    """Test AUC of a classifier trained on uint8 images ``x_train`` (N, S, S) with labels 0..K-1."""
    torch.manual_seed(spec.seed)
    xt, xs = _standardise(x_train, x_test)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    model = build_model(spec.model, n_classes, spec.image_size, spec.width).to(spec.device)
    if spec.model == "linear":
        _fit_lbfgs(model, xt, yt, spec)
    else:
        _fit_minibatch(model, xt, yt, spec)
    return auc(y_test, _predict(model, xs, spec.device).numpy())


def train_segmenter(
    x_train: np.ndarray,
    m_train: np.ndarray,
    x_test: np.ndarray,
    m_test: np.ndarray,
    n_classes: int,
    spec: TrainSpec,
) -> float:
    """Test mean foreground Jaccard of a U-Net trained on uint8 images and label maps (N, S, S)."""
    torch.manual_seed(spec.seed)
    xt, xs = _standardise(x_train, x_test)
    mt = torch.from_numpy(np.asarray(m_train, dtype=np.int64))
    model = build_model(spec.model, n_classes, spec.image_size, spec.width).to(spec.device)
    _fit_minibatch(model, xt, mt, spec)
    inter = np.zeros(n_classes, np.int64)
    union = np.zeros(n_classes, np.int64)
    for i in range(0, len(xs), EVAL_BATCH):
        pred = _predict(model, xs[i : i + EVAL_BATCH], spec.device).argmax(dim=1).numpy()
        a, b = jaccard_counts(pred, np.asarray(m_test[i : i + EVAL_BATCH], dtype=np.int64), n_classes)
        inter += a
        union += b
    return mean_jaccard(inter, union)
