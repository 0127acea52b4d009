"""Cached embeddings -> a 2-D map (t-SNE or PCA) coloured by class, saved as a PNG.

A look before training a head: classes that form their own islands on the map are what a linear head
will separate; classes smeared into each other need more data, a better backbone, or fine-tuning.
Beside the picture, one number measured in the full embedding space rather than the flattened map:
how often an image's nearest neighbour (cosine) is of its own class, against what chance gives; the
neighbour is another picture's (a copy or a near copy of the image itself would vouch for nothing).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import check_output_file

_logger = logging.getLogger(__name__)


@dataclass
class EmbeddingMap:
    """What :func:`plot_embeddings` drew: ``points`` float32 (n, 2) for the sampled ``keys``."""

    png: Path
    method: str
    keys: list[str]
    points: np.ndarray
    labels: np.ndarray  # int32 (n,), -1 for unlabelled
    class_names: list[str]
    n_total: int  # rows in the cache; the map shows a stratified sample of them
    neighbour_agreement: float | None  # share whose nearest neighbour has the same class (labelled rows)
    chance_agreement: float | None  # the same for labels drawn at random with the class shares
    n_copies: int = 0  # sampled rows left out: the same bytes and class as another (find_copies)
    n_near_copies: int = 0  # sampled rows with a near copy (one picture resized, re-encoded): not neighbours
    n_gone: int = 0  # rows left out: files the last embed found deleted or unreadable (kept until --prune)

    def text(self) -> str:
        return f"{self.what()} -> {self.png}" + (f"\n{self.agreement()}" if self.agreement() else "")

    def what(self) -> str:
        sampled = len(self.keys) + self.n_copies
        shown = f"{sampled:,} of {self.n_total:,}" if sampled < self.n_total else f"{self.n_total:,}"
        left_out = []
        if self.n_copies:
            left_out.append(f"{self.n_copies:,} cop{'ies' if self.n_copies > 1 else 'y'} of other images")
        if self.n_gone:
            left_out.append(f"{self.n_gone:,} of files deleted from the folder or unreadable now")
        return f"{self.method} map of {shown} embeddings" + (f" ({', '.join(left_out)} left out)" if left_out else "")

    def agreement(self) -> str:
        if self.neighbour_agreement is None:
            return ""
        near = (f"; {self.n_near_copies:,} near copies, a picture's copies are not each other's neighbours"
                if self.n_near_copies else "")
        return (f"nearest neighbour of the same class: {self.neighbour_agreement:.3f} "
                f"(chance {self.chance_agreement:.3f}{near})")


def plot_embeddings(
    cache: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    method: Literal["tsne", "pca"] = "tsne",
    max_points: int = 3000,
    seed: int = 0,
) -> EmbeddingMap:
    """Draw a cache's embeddings on a plane, coloured by class, into the PNG ``output`` (default: next
    to the cache, ``CACHE.map.png``).

    Args:
        model: the cache's model group, when it holds several.
        method: "tsne" (neighbourhoods kept, a few seconds per thousand points; PCA to 50 dimensions
            first) or "pca" (the two directions of most variance, instant).
        max_points: a larger cache is sampled, each class in its share (at least 5 of each).
    """
    from sklearn.decomposition import PCA

    check_output_file(output, example="map.png")

    from .errors import FeatxError
    from .store import (check_finite, find_copies, gone_rows, load_embeddings, load_labels, near_copy_counts,
                        near_copy_groups, unit_rows)

    if method not in ("tsne", "pca"):
        raise FeatxError(f"method {method!r}: expected tsne or pca")
    all_labels = load_labels(cache, model)  # the sample is chosen first: a cache of millions is not read whole
    # rows of files deleted from the folder since (kept until --prune) are not the folder's any more
    present = np.flatnonzero(~gone_rows(cache, model))
    n_total = len(present)
    if n_total < 3:
        raise FeatxError(f"{cache}: {n_total} embeddings; a map needs at least 3")
    data = load_embeddings(cache, model, rows=present[_stratified_sample(all_labels[present], max_points, seed)])
    check_finite(data, cache)
    # a copy (same bytes, same class) would be its twin's nearest neighbour and lift the agreement
    copies = find_copies(data.keys, data.labels, data.digests, folder=data.attrs.get("folder"))
    X, labels, keys = data.embeddings[copies.keep], data.labels[copies.keep], [data.keys[i] for i in copies.keep]
    if len(X) < 3:
        raise FeatxError(f"{cache}: {len(X)} distinct images ({copies.n_copies} copies left out); a map needs at least 3")
    X = unit_rows(X)  # neighbours by cosine, as featx similar finds them
    # a near copy (the photo resized, re-encoded) would be as good a twin as a copy
    pictures = near_copy_groups(data.phashes[copies.keep])
    agreement, chance = _neighbour_agreement(X, labels, pictures)
    if method == "pca":
        points = PCA(n_components=2, random_state=seed).fit_transform(X)
    else:
        from sklearn.manifold import TSNE

        reduced = PCA(n_components=min(50, *X.shape), random_state=seed).fit_transform(X)
        points = TSNE(n_components=2, perplexity=min(30.0, (len(X) - 1) / 3), init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(reduced)
    output = Path(output) if output else Path(cache).with_suffix(".map.png")
    result = EmbeddingMap(output, "t-SNE" if method == "tsne" else "PCA", keys, points.astype(np.float32),
                          labels, data.class_names, n_total, agreement, chance, copies.n_copies,
                          near_copy_counts(pictures)[0], len(all_labels) - n_total)
    _draw(result, title=f"{data.model}: {result.what()}")
    return result


def _stratified_sample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Row indices, sorted: everything when it fits, else each label value in its share, at least 5."""
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = min(len(members), max(5, round(max_points * len(members) / len(labels))))
        picked.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(picked))


def _neighbour_agreement(X: np.ndarray, labels: np.ndarray, pictures: np.ndarray) -> tuple[float | None, float | None]:
    """Leave-one-picture-out 1-NN agreement among labelled rows of unit vectors, and its chance level
    Σ p_c². ``pictures``: a group per row (:func:`featx.store.near_copy_groups`); a row's neighbour is
    the nearest row of another picture. A row whose picture has every other row is not counted."""
    labelled = labels >= 0
    if labelled.sum() < 2 or len(np.unique(labels[labelled])) < 2:
        return None, None
    Y, y, picture = X[labelled], labels[labelled], pictures[labelled]
    nearest = np.empty(len(Y), dtype=np.int64)
    alone = np.zeros(len(Y), dtype=bool)
    for start in range(0, len(Y), 1024):  # (1024, n) similarities at a time
        sims = Y[start:start + 1024] @ Y.T
        sims[picture[start:start + len(sims), None] == picture[None, :]] = -np.inf  # not itself nor its copies
        nearest[start:start + len(sims)] = sims.argmax(axis=1)
        alone[start:start + len(sims)] = np.isneginf(sims.max(axis=1))
    if alone.all():
        return None, None
    shares = np.bincount(y) / len(y)
    return float(np.mean(y[nearest][~alone] == y[~alone])), float(np.sum(shares ** 2))


def _draw(result: EmbeddingMap, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in range(len(result.class_names)) if np.any(result.labels == c)]
    cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    unlabelled = result.labels < 0
    # dots of 6 pt² keep 2,000 points apart; a few dozen would be specks
    size = float(np.clip(12000 / max(len(result.points), 1), 6, 40))
    if unlabelled.any():
        ax.scatter(*result.points[unlabelled].T, s=size, c="0.7", label="(no class)", linewidths=0)
    for i, c in enumerate(present):
        mine = result.labels == c
        ax.scatter(*result.points[mine].T, s=size, color=cmap(i % cmap.N), label=result.class_names[c], linewidths=0)
    if len(present) <= 30:
        ax.legend(markerscale=np.sqrt(54 / size), fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False)
    if len(present) > cmap.N:
        _logger.info("%d classes share %d colours on the map", len(present), cmap.N)
    ax.set_xticks([])
    ax.set_yticks([])
    # wrapped to the figure: the agreement line alone (near copies named) ran past both edges
    ax.set_title(title + (f"\n{result.agreement()}" if result.agreement() else ""), fontsize="medium", wrap=True)
    result.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(result.png, dpi=110)
    plt.close(fig)
