"""Scores of one trained model: ROC AUC for classification, mean Jaccard for segmentation."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney form, ties counted half); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC of class probabilities ``proba`` (n, K) for labels ``y``: binary, or macro one-vs-rest.

    Classes absent from ``y`` are left out of the macro average.
    """
    y = np.asarray(y)
    if proba.shape[1] == 2:
        return binary_auc(y == 1, proba[:, 1])
    per_class = [binary_auc(y == k, proba[:, k]) for k in range(proba.shape[1])]
    scores = [s for s in per_class if not np.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


def jaccard_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union pixel counts of label maps ``pred`` and ``truth``."""
    pred = np.asarray(pred).ravel()
    truth = np.asarray(truth).ravel()
    inter = np.bincount(truth[pred == truth], minlength=n_classes)[:n_classes]
    area_pred = np.bincount(pred, minlength=n_classes)[:n_classes]
    area_true = np.bincount(truth, minlength=n_classes)[:n_classes]
    return inter.astype(np.int64), (area_pred + area_true - inter).astype(np.int64)


def mean_jaccard(inter: np.ndarray, union: np.ndarray) -> float:
    """Mean over foreground classes (1..K-1) of intersection / union pooled over the test set.

    A class that appears neither in the predictions nor in the truth is left out; NaN if all are.
    """
    inter, union = np.asarray(inter)[1:], np.asarray(union)[1:]
    present = union > 0
    if not present.any():
        return float("nan")
    return float(np.mean(inter[present] / union[present]))
