"""Benchmark: do the label-free rankings train better models than random subsets of the same size?

For each image set (``enrich_dist.datasets.clips``) and each rule, a fixed model is trained on every
prefix of the ranking at each budget, for ``--replicates`` replicates (different random seed sets,
shared by every rule in a replicate, as the select stage does), and scored on held-out sources; each
rule is compared with random subsets by a two-sided Mann-Whitney U test per budget (``p_vs_random``).
Because a replicate's rule and random subsets share the seed set and the model's seed, the records
also carry the paired comparison: a two-sided Wilcoxon signed-rank test of the per-replicate
differences (``p_paired_vs_random``; it removes the model's seed-to-seed spread that both share),
how many replicates the rule was ahead (``wins``), and every replicate's AUC (``aucs``).

- Split: a seeded 20 % of the patients (sources) are held out; the test set is one frame per held-out
  clip (the first), so long clips do not weigh more; the pool to rank is every image of the others.
- Embedding used by the rules: ``--embedder`` (default ``contrastive``; ``vae`` or ``pixels``),
  trained on a seeded sample of the pool as the train-encoder stage does; cached in ``--cache``.
- Rules: ``random``; ``batch`` (the paper's: least similar to the chosen set in batches of
  ``--batch-size``); ``exact`` (farthest-first); ``coverage`` (ProbCover's greedy coverage of
  delta-balls, delta by its label-free purity rule); ``herding`` (facility location on the same
  graph); and ``+guard`` variants (no second member of a near-duplicate group, pairs above
  ``--duplicate-threshold``, before every group has one); ``cells`` (farthest-first within k-means
  cells of the stage's default 1,024 images, ``--mode cells``).
- Model: multinomial logistic regression (scikit-learn, fixed settings) on the 16x16 block means of
  the images (``--model pixels``), independent of the embedding that chose the subset; or on the
  embedding itself (``--model probe``, a linear probe); or the evaluation stage's own networks on
  32x32 images with the stage's default schedule (``--model cnn``: its small CNN, the CPU default;
  ``--model linear``: its linear model), seeded per replicate. Score: macro one-vs-rest AUC.

Prints a table per set and appends one JSON line per (set, rule, budget) to ``--out``:

    python -m benchmarks.selection_quality --out benchmarks/results/selection_quality.jsonl
    python -m benchmarks.selection_quality --sets digits-uneven --embedder pixels --replicates 5
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import torch
from scipy.stats import mannwhitneyu, wilcoxon

from benchmarks.similarity import source_version
from enrich_dist.config import EncoderConfig, SelectConfig, resolve_size
from enrich_dist.datasets import clips
from enrich_dist.embed import PixelEmbedder
from enrich_dist.encoder import embed_images, train_encoder_model
from enrich_dist.selection import batch_greedy, choose_seeds, exact_greedy
from enrich_dist.selection.cells import cell_count, make_cells, rank_in_process
from enrich_dist.selection.coverage import (
    choose_delta,
    coverage_ranking,
    duplicate_groups,
    duplicate_guard,
    herding_ranking,
    neighbor_graph,
)
from enrich_dist.selection.greedy import DEFAULT_POOL

log = logging.getLogger("benchmarks.selection_quality")
SETS = ("digits-uneven", "digits-5", "echo-uneven")
RULES = ("batch", "exact", "coverage", "herding", "exact+guard", "coverage+guard", "cells")
BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.22, 0.44)


def load_set(name: str, echo_images: int, seed: int) -> clips.ClipSet:
    """The named labelled image set, made into clips."""
    if name == "digits-uneven":
        return clips.digits_clips(uneven=True, seed=seed)
    if name.startswith("digits-"):
        return clips.digits_clips(int(name.split("-")[1]), seed=seed)
    if name.startswith("echo-"):
        return clips.echo_clips(echo_images, profile=name.split("-")[1], seed=seed)
    raise ValueError(f"unknown set {name!r}; known: {', '.join(SETS)}")


def split(data: clips.ClipSet, seed: int, test_share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, test rows): a seeded share of the patients held out, one frame per held-out clip."""
    patients = np.unique(data.patient_ids)
    rng = np.random.default_rng([seed, 99])
    held = set(rng.choice(patients, size=max(1, round(test_share * len(patients))), replace=False).tolist())
    is_test = np.isin(data.patient_ids, list(held))
    first = np.zeros(len(data), bool)
    _, first_rows = np.unique(data.clip_ids, return_index=True)
    first[first_rows] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test & first)


def pixels(images: np.ndarray) -> np.ndarray:
    """L2-normalised, mean-centred 16x16 block means."""
    v = PixelEmbedder(16)(images)
    return (v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def embedding(name: str, images: np.ndarray, train_rows: np.ndarray, epochs: int, seed: int, cache: str | None) -> np.ndarray:
    """L2-normalised embeddings of every image by the named embedder, trained on a sample of ``train_rows`` (cached)."""
    if name == "pixels":
        return pixels(images)
    key = hashlib.sha1(images.tobytes() + train_rows.tobytes()).hexdigest()[:12]
    path = os.path.join(cache, f"{name}-{epochs}-{seed}-{key}.npy") if cache else None
    if path and os.path.exists(path):
        return np.load(path)
    cfg = dataclasses.replace(EncoderConfig(), epochs=epochs, seed=seed, device="cpu")
    n = resolve_size(cfg.sample, len(train_rows))
    pick = np.sort(np.random.default_rng(seed).choice(train_rows, size=n, replace=False))
    start = time.perf_counter()
    model, _ = train_encoder_model(images[pick], cfg, model=name, log_every=10**9)
    log.info("trained the %s encoder on %d images in %.0f s", name, n, time.perf_counter() - start)
    x = embed_images(model, images)
    if path:
        os.makedirs(cache, exist_ok=True)
        np.save(path, x)
    return x


def auc(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Macro one-vs-rest AUC on the test set of a logistic regression fitted to ``train`` rows (NaN: one class only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    classes = np.unique(test_y)
    y = labels[train]
    if len(np.unique(y)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=1.0, max_iter=300).fit(features[train], y)
    proba = np.zeros((len(test_y), len(classes)))
    known = {c: i for i, c in enumerate(model.classes_)}
    for j, c in enumerate(classes):
        if c in known:
            proba[:, j] = model.predict_proba(test_x)[:, known[c]]
    if len(classes) == 2:
        return float(roc_auc_score(test_y == classes[1], proba[:, 1]))
    return float(roc_auc_score(test_y, proba / proba.sum(1, keepdims=True).clip(1e-12), multi_class="ovr", labels=classes))


STAGE_MODELS = ("cnn", "linear")


def stage_images(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Images in [0, 1] as the evaluation stage feeds its networks: uint8, ``size`` x ``size`` (block means)."""
    factor = images.shape[1] // size
    small = images[:, : size * factor, : size * factor].reshape(len(images), size, factor, size, factor).mean((2, 4))
    return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


def stage_auc(model: str, images: np.ndarray, codes: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> float:
    """Test AUC of the evaluation stage's ``model`` trained on ``train`` rows (its default settings, seeded)."""
    from enrich_dist.config import EvaluateConfig
    from enrich_dist.evaluation.train import TrainSpec, train_classifier

    cfg = EvaluateConfig()
    spec = TrainSpec(
        model=model, image_size=images.shape[1], epochs=cfg.epochs, min_steps=cfg.min_steps, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, seed=seed,
    )
    return train_classifier(images[train], codes[train], images[test], codes[test], int(codes.max()) + 1, spec)


def rankings(x: np.ndarray, seeds: np.ndarray, batch_size: int, graph, groups: np.ndarray, rng) -> dict[str, np.ndarray]:
    """Every rule's full ranking (row order) from the same seeds."""
    n = len(x)
    rest = np.setdiff1d(np.arange(n), seeds)
    out = {"random": np.concatenate([seeds, rng.permutation(rest)])}
    out["batch"] = batch_greedy(x, seeds, batch_size).order
    out["exact"] = exact_greedy(x, seeds).order
    out["coverage"] = coverage_ranking(graph, n, seeds).order
    out["herding"] = herding_ranking(graph, n, seeds).order
    out["exact+guard"] = duplicate_guard(out["exact"], groups, len(seeds))
    out["coverage+guard"] = duplicate_guard(out["coverage"], groups, len(seeds))
    out["cells"] = rank_in_process(x, make_cells(x, cell_count(n, SelectConfig().cell_size), seed=0, threads=2), seeds, DEFAULT_POOL).order
    return out


def run_set(name: str, args: argparse.Namespace) -> list[dict]:
    """Every rule and budget on one set; one record per (rule, budget)."""
    data = load_set(name, args.echo_images, args.seed)
    pool, test = split(data, args.seed)
    every = embedding(args.embedder, data.images, pool, args.epochs, args.seed, args.cache)
    x = every[pool]
    if args.model in STAGE_MODELS:
        small, codes = stage_images(data.images), np.unique(data.labels, return_inverse=True)[1]
        feats_pool, test_x = small[pool], small[test]
        labels, test_y = codes[pool], codes[test]
    else:
        features = pixels(data.images) if args.model == "pixels" else every
        feats_pool, test_x = features[pool], features[test]
        labels, test_y = data.labels[pool], data.labels[test]
    sources = data.clip_ids[pool]
    n = len(pool)
    start = time.perf_counter()
    delta, info = choose_delta(x, seed=args.seed)
    graph = neighbor_graph(x, delta)
    groups = duplicate_groups(x, args.duplicate_threshold)
    log.info(
        "%s: %d pool images (%d sources), %d test; delta %.2f (purity rule, passed %s), %d edges, %d duplicate groups (t %.2f); %.1f s",
        name, n, len(np.unique(sources)), len(test), delta, info.get("passed"), graph.nnz, len(np.unique(groups)),
        args.duplicate_threshold, time.perf_counter() - start,
    )
    def score(train: np.ndarray, replicate: int) -> float:
        if args.model in STAGE_MODELS:
            both = np.concatenate([feats_pool, test_x])
            return stage_auc(args.model, both, np.concatenate([labels, test_y]), train, n + np.arange(len(test_x)), replicate)
        return auc(feats_pool, labels, train, test_x, test_y)

    full = score(np.arange(n), 0)
    seed_size = max(1, resolve_size(args.seed_size, n))
    batch_size = max(1, resolve_size(args.batch_size, n))
    sizes = [(b, max(seed_size, resolve_size(b, n))) for b in args.budgets]
    scores: dict[tuple[str, float], list[float]] = {}
    covered: dict[tuple[str, float], list[int]] = {}
    for r in range(args.replicates):
        rng = np.random.default_rng([args.seed, r])
        seeds = rng.permutation(choose_seeds(n, seed_size, rng))
        for rule, order in rankings(x, seeds, batch_size, graph, groups, rng).items():
            if rule != "random" and rule not in args.rules:
                continue
            for budget, k in sizes:
                scores.setdefault((rule, budget), []).append(score(order[:k], r))
                covered.setdefault((rule, budget), []).append(len(np.unique(sources[order[:k]])))
        log.info("%s: replicate %d/%d done", name, r + 1, args.replicates)
    records = []
    for (rule, budget), values in scores.items():
        base = scores[("random", budget)]
        p = float("nan") if rule == "random" else float(mannwhitneyu(values, base, alternative="two-sided").pvalue)
        paired, wins = paired_test(values, base) if rule != "random" else (float("nan"), 0)
        records.append({
            "benchmark": "selection_quality", "set": name, "embedder": args.embedder, "model": args.model, "rule": rule,
            "budget": budget, "n_images": dict(sizes)[budget], "pool": n, "test": len(test),
            "auc_mean": float(np.nanmean(values)), "auc_std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
            "random_auc_mean": float(np.nanmean(base)), "p_vs_random": p,
            "p_paired_vs_random": paired, "wins": wins, "aucs": [float(v) for v in values],
            "sources_mean": float(np.mean(covered[(rule, budget)])), "random_sources_mean": float(np.mean(covered[("random", budget)])),
            "full_pool_auc": full, "replicates": args.replicates, "seed_size": seed_size, "batch_size": batch_size,
            "delta": delta, "duplicate_threshold": args.duplicate_threshold,
            "commit": source_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    return records


def paired_test(values: list[float], base: list[float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p of the per-replicate differences, and the replicates ahead.

    Replicate r of a rule and of random share the seed set and the model's seed, so their difference
    is free of the model's seed-to-seed spread. All-zero differences give p = 1.
    """
    diff = np.asarray(values, float) - np.asarray(base, float)
    diff = diff[~np.isnan(diff)]
    wins = int(np.count_nonzero(diff > 0))
    if len(diff) == 0 or not np.any(diff):
        return 1.0, wins
    return float(wilcoxon(diff, alternative="two-sided").pvalue), wins


def print_table(records: list[dict]) -> None:
    """AUC per rule and budget, marked + / - where the difference from random is significant (Mann-Whitney
    p < 0.05), each rule followed by the paired test's p."""
    budgets = sorted({r["budget"] for r in records})
    rules = list(dict.fromkeys(r["rule"] for r in records))
    by = {(r["rule"], r["budget"]): r for r in records}
    first = records[0]
    print(f"\n{first['set']} ({first['pool']} pool images, full-pool AUC {first['full_pool_auc']:.3f}, "
          f"embedder {first['embedder']}, model {first['model']}, {first['replicates']} replicates)")
    print(f"{'rule':<16}" + "".join(f"{b:>11.0%}" for b in budgets))
    for rule in rules:
        cells = []
        for b in budgets:
            r = by[(rule, b)]
            mark = "" if rule == "random" or not r["p_vs_random"] < 0.05 else ("+" if r["auc_mean"] > r["random_auc_mean"] else "-")
            cells.append(f"{r['auc_mean']:.3f}{mark:<1}".rjust(11))
        print(f"{rule:<16}" + "".join(cells))
        if rule != "random" and "p_paired_vs_random" in by[(rule, budgets[0])]:
            print(f"{'  paired p':<16}" + "".join(f"{by[(rule, b)]['p_paired_vs_random']:>11.3f}" for b in budgets))
    print(f"{'sources (rnd)':<16}" + "".join(f"{by[('random', b)]['sources_mean']:>11.0f}" for b in budgets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--embedder", default="contrastive", choices=["contrastive", "vae", "pixels"])
    parser.add_argument("--model", default="pixels", choices=["pixels", "probe", *STAGE_MODELS])
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="shares of the pool to label")
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--seed-size", default="0.005", help="random seed set per replicate (fraction or count)")
    parser.add_argument("--batch-size", default="0.11", help="the batch rule's round size (the paper's 0.11)")
    parser.add_argument("--duplicate-threshold", type=float, default=0.9)
    parser.add_argument("--echo-images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=EncoderConfig.epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join("bench-out", "embeddings"), help="embedding cache folder")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args()
    args.rules = args.rules.split(",")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    for name in args.sets.split(","):
        records = run_set(name, args)
        if args.out:
            with open(args.out, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
        print_table(records)


if __name__ == "__main__":
    main()
