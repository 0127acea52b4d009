"""Query images -> the most similar images of an embedding cache (cosine similarity of embeddings).

The queries are embedded with the model the cache was made with (checked by fingerprint: embeddings of
another model or preprocessing are not comparable), then the cache is read a chunk at a time, so a cache
of millions of rows is searched in bounded memory. Exact search: one matrix product per chunk.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .backbones import DEFAULT_BACKBONE

_logger = logging.getLogger(__name__)


@dataclass
class SimilarImages:
    """The cached images closest to one query: ``matches`` as (key, cosine similarity), best first, one
    per content: other cached paths of a match's bytes (the same photo in two folders) are its ``copies``."""

    query: str
    matches: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None  # the query could not be read
    copies: dict[str, list[str]] = field(default_factory=dict)  # match key -> other keys with the same bytes
    folder: str | None = None  # the folder the cache follows: the keys are paths relative to it

    def text(self) -> str:
        """The query, then a line per match: its similarity and its file's path (the cache's folder
        joined to its key, to open it), with the copies' paths beside it."""
        from .data import printable

        if self.error:
            return f"{printable(self.query)}  FAILED: {self.error}"

        def path(key: str) -> str:
            return printable(os.path.join(self.folder, key) if self.folder else key)

        return "\n".join([printable(self.query)] + [
            f"  {similarity:.3f}  {path(key)}"
            + (f"  (same file: {', '.join(map(path, self.copies[key]))})" if key in self.copies else "")
            for key, similarity in self.matches])


def find_similar(
    images: Sequence[str | os.PathLike],
    cache: str | os.PathLike,
    *,
    k: int = 5,
    model: str | os.PathLike | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    rows_per_chunk: int = 16384,
) -> list[SimilarImages]:
    """For each image file (and every image under each folder), the ``k`` most similar cached images.

    Args:
        cache: an embedding cache made by :func:`featx.embed_folder`; of its model groups, the one whose
            fingerprint is ``model``'s is searched.
        model: the backbone name or .onnx file the cache was embedded with; by default the cache's own
            (recorded when it was embedded, or the models folder's file of its group name) when it holds
            one model, else Lite0.
    A query that cannot be read is a result with ``error``; the others are still searched. A query from
    the folder the cache follows is not its own match (other files with its bytes are), and when it is
    unchanged since it was embedded its stored embedding serves.
    """
    from .errors import FeatxError
    from .export import ensure_model_file
    from .pipeline import encode_files_through_cache, expand_inputs
    from .runtime import load_model, model_file_for, read_model_info
    from .store import iter_embeddings, model_fingerprints, recorded_paths

    if k < 1:
        raise FeatxError(f"k={k}: ask for at least one match")
    groups = model_fingerprints(cache)  # a missing or unreadable cache is refused before the model loads
    if not groups:
        raise FeatxError(f"{cache} holds no featx embeddings to search (make them with: featx embed FOLDER -o {cache})")
    if model is None and weights is None and len(groups) == 1:
        [(name, theirs)] = groups.items()
        model = model_file_for(name, theirs, recorded_paths(cache, "model_file")[name])
    model_file = ensure_model_file(model or DEFAULT_BACKBONE, weights=weights)
    fingerprint = read_model_info(model_file).fingerprint
    group = next((name for name, theirs in groups.items() if theirs == fingerprint), None)
    if group is None:
        raise FeatxError(f"{cache} holds no embeddings of {model_file} (fingerprint {fingerprint}); it has "
                         + ", ".join(f"{name} ({theirs})" for name, theirs in groups.items())
                         + ": pass the model the cache was made with as --model")
    # a query from the cache's own folder: its row is left out of its matches (it would come first, at
    # 1.000), and when the file is unchanged its stored embedding serves, without decoding it again
    results, queries, skipped_rows = [], [], []
    folder = recorded_paths(cache, "folder")[group]
    for path, embedding, error, own_row in encode_files_through_cache(
            lambda: load_model(model_file, device=device, engine="onnx", spin=False), expand_inputs(images), cache,
            group, batch_size=batch_size):
        results.append(SimilarImages(path, error=error, folder=folder))
        if error is None:
            queries.append(embedding)
            skipped_rows.append(own_row)
    searched = [r for r in results if r.error is None]
    if not searched:
        return results
    Q = unit_rows(np.stack(queries))  # (n_queries, D)
    kept: list[list[tuple[float, str, bytes]]] = [[] for _ in range(len(Q))]  # per query, best first
    start = 0  # the chunk's first row
    for keys, embeddings, digests in iter_embeddings(cache, group, rows_per_chunk=rows_per_chunk, with_digests=True):
        for i, sims in enumerate(Q @ unit_rows(embeddings).T):
            if start <= skipped_rows[i] < start + len(keys):
                sims[skipped_rows[i] - start] = -np.inf
            # the chunk's rows best first beside those kept so far (earlier rows first among equals)
            chunk = ((float(sims[j]), keys[j], bytes(digests[j])) for j in np.argsort(-sims, kind="stable")
                     if sims[j] > -np.inf)
            kept[i] = _top_contents(heapq.merge(kept[i], chunk, key=lambda row: -row[0]), k)
        start += len(keys)
    for result, rows in zip(searched, kept):
        first: dict[bytes | str, str] = {}  # content -> key of its best-ranked row
        for similarity, key, digest in rows:
            content = digest or key
            if content in first:
                result.copies.setdefault(first[content], []).append(key)
            else:
                first[content] = key
                result.matches.append((key, similarity))
    return results


def _top_contents(rows, k: int) -> list[tuple[float, str, bytes]]:
    """Of (similarity, key, digest) rows given best first, those of the ``k`` most similar contents: every
    row of a chosen digest is kept (copies embed the same bytes, so they tie with their original);
    rows without a digest (b"") each count as their own content."""
    chosen: set = set()
    out: list[tuple[float, str, bytes]] = []
    floor = -np.inf
    for row in rows:
        similarity, key, digest = row
        content = digest or key
        if content in chosen:
            out.append(row)
        elif len(chosen) < k:
            chosen.add(content)
            out.append(row)
            floor = similarity
        elif similarity < floor - 1e-5:  # below the k-th content: no copy of a chosen one can follow
            break
    return out


def unit_rows(X: np.ndarray) -> np.ndarray:
    """float32 (n, D) rows scaled to length 1, so that a matrix product gives cosine similarities."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
