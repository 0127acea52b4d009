"""Query images -> the most similar images of an embedding cache (cosine similarity of embeddings).

The queries are embedded with the model the cache was made with (checked by fingerprint: embeddings of
another model or preprocessing are not comparable), then the cache is read a chunk at a time, so a cache
of millions of rows is searched in bounded memory. Exact search: one matrix product per chunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .backbones import DEFAULT_BACKBONE

_logger = logging.getLogger(__name__)


@dataclass
class SimilarImages:
    """The cached images closest to one query: ``matches`` as (key, cosine similarity), best first."""

    query: str
    matches: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None  # the query could not be read

    def text(self) -> str:
        if self.error:
            return f"{self.query}  FAILED: {self.error}"
        return "\n".join([self.query] + [f"  {similarity:.3f}  {key}" for key, similarity in self.matches])


def find_similar(
    images: Sequence[str | os.PathLike],
    cache: str | os.PathLike,
    *,
    k: int = 5,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    rows_per_chunk: int = 16384,
) -> list[SimilarImages]:
    """For each image file (and every image under each folder), the ``k`` most similar cached images.

    Args:
        cache: an embedding cache made by :func:`featx.embed_folder`; of its model groups, the one whose
            fingerprint is ``model``'s is searched.
        model: the backbone name or .onnx file the cache was embedded with (default Lite0).
    A query that cannot be read is a result with ``error``; the others are still searched.
    """
    from .errors import FeatxError
    from .export import ensure_model_file
    from .pipeline import encode_files, expand_inputs
    from .runtime import load_model, read_model_info
    from .store import iter_embeddings, model_fingerprints

    if k < 1:
        raise FeatxError(f"k={k}: ask for at least one match")
    groups = model_fingerprints(cache)  # a missing or unreadable cache is refused before the model loads
    model_file = ensure_model_file(model, weights=weights)
    fingerprint = read_model_info(model_file).fingerprint
    group = next((name for name, theirs in groups.items() if theirs == fingerprint), None)
    if group is None:
        raise FeatxError(f"{cache} holds no embeddings of {model_file} (fingerprint {fingerprint}); it has "
                         + ", ".join(f"{name} ({theirs})" for name, theirs in groups.items())
                         + ": pass the model the cache was made with as --model")
    engine = load_model(model_file, device=device, engine="onnx")
    results, queries = [], []
    for path, embedding, _, error in encode_files(engine, expand_inputs(images), batch_size=batch_size):
        results.append(SimilarImages(path, error=error))
        if error is None:
            queries.append(embedding)
    searched = [r for r in results if r.error is None]
    if not searched:
        return results
    Q = unit_rows(np.stack(queries))  # (n_queries, D)
    best_sim = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    best_key = np.empty((len(Q), 0), dtype=object)
    for keys, embeddings in iter_embeddings(cache, group, rows_per_chunk=rows_per_chunk):
        embeddings = unit_rows(embeddings)
        # the chunk's similarities beside the best so far; keep the k highest of each row
        sims = np.concatenate([best_sim, Q @ embeddings.T], axis=1)
        names = np.concatenate([best_key, np.broadcast_to(np.array(keys, dtype=object), (len(Q), len(keys)))],
                               axis=1)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best_sim, best_key = np.take_along_axis(sims, top, axis=1), np.take_along_axis(names, top, axis=1)
    for result, sims, keys in zip(searched, best_sim, best_key):
        result.matches = [(str(key), float(s)) for key, s in zip(keys, sims)]
    return results


def unit_rows(X: np.ndarray) -> np.ndarray:
    """float32 (n, D) rows scaled to length 1, so that a matrix product gives cosine similarities."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
