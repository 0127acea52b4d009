"""Query images -> the most similar images of an embedding cache (cosine similarity of embeddings).

The queries are embedded with the model the cache was made with (checked by fingerprint: embeddings of
another model or preprocessing are not comparable), then the cache is read a chunk at a time, so a cache
of millions of rows is searched in bounded memory. Exact search: one matrix product per chunk.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import DEFAULT_BACKBONE
from .store import unit_rows

_logger = logging.getLogger(__name__)


@dataclass
class SimilarImages:
    """The cached images closest to one query: ``matches`` as (key, cosine similarity), best first, one
    per picture: other cached paths of a match's bytes (the same photo in two folders) are its ``copies``,
    those of the same picture resized or re-encoded its ``near_copies``, however they rank. The query's
    own picture stored under other files comes first whatever its similarity: its key is ``query_picture``."""

    query: str
    matches: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None  # the query could not be read
    copies: dict[str, list[str]] = field(default_factory=dict)  # match key -> other keys with the same bytes
    folder: str | None = None  # the folder the cache follows: the keys are paths relative to it
    # match key -> keys of its near copies (perceptual hashes within NEAR_COPY_BITS), however low they rank
    near_copies: dict[str, list[str]] = field(default_factory=dict)
    # the match that is the query's picture (the same bytes, or resized or re-encoded: perceptual hashes
    # within NEAR_COPY_BITS), with its other files among its copies and near copies; None when none is cached
    query_picture: str | None = None

    def path_of(self, key: str) -> str:
        """A match's file: the cache's folder joined to its key, to open it."""
        return os.path.join(self.folder, key) if self.folder else key

    def text(self) -> str:
        """The query, then a line per match: its similarity and its file's path (the cache's folder
        joined to its key, to open it), marked when it is the query's own picture, with the copies'
        paths beside it."""
        from .data import printable

        if self.error:
            return f"{printable(self.query)}  FAILED: {self.error}"

        def path(key: str) -> str:
            return printable(self.path_of(key))

        return "\n".join([printable(self.query)] + [
            f"  {similarity:.3f}  {path(key)}"
            + ("  (same picture as the query)" if key == self.query_picture else "")
            + (f"  (same file: {', '.join(map(path, self.copies[key]))})" if key in self.copies else "")
            + (f"  (same picture: {', '.join(map(path, self.near_copies[key]))})" if key in self.near_copies else "")
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
    output: str | os.PathLike | None = None,
    min_similarity: float | None = None,
    sheet: str | os.PathLike | None = None,
) -> list[SimilarImages]:
    """For each image file (and every image under each folder), the ``k`` most similar cached images.

    Args:
        cache: an embedding cache made by :func:`featx.embed_folder`; of its model groups, the one whose
            fingerprint is ``model``'s is searched.
        model: the backbone name or .onnx file the cache was embedded with; by default the cache's own
            (recorded when it was embedded, or the models folder's file of its group name) when it holds
            one model, else Lite0.
        output: also write the matches to this CSV (:func:`write_similar`), refused before the search
            when no file can be written there.
        min_similarity: only matches at least this similar (cosine): a query may then have fewer than
            ``k``, or none. The query's own picture is kept whatever its similarity.
        sheet: also draw the queries and their matches as thumbnails in this PNG (:func:`plot_similar`).
    A query that cannot be read is a result with ``error``; the others are still searched. A query from
    the folder the cache follows is not its own match (other files with its bytes are), and when it is
    unchanged since it was embedded its stored embedding serves. The query's own picture under other
    files (its bytes, or resized or re-encoded: by perceptual hash) is the first match, whatever its
    similarity: a copy at a sixth of the size scores a cosine of 0.36 to 0.99 (median 0.70) on 21 real
    photos, where distinct photos came up to 0.49 (``python benchmarks/near_copies.py``).
    """
    from .errors import check_output_file

    check_output_file(output, example="similar.csv")
    check_output_file(sheet, example="similar.png")
    results = _search(images, cache, k=k, model=model, weights=weights, device=device, batch_size=batch_size,
                      rows_per_chunk=rows_per_chunk, min_similarity=-np.inf if min_similarity is None else min_similarity)
    if output is not None:
        write_similar(results, output)
    if sheet is not None:
        plot_similar(results, Path(sheet))
    return results


def _search(images, cache, *, k: int, model, weights, device, batch_size, rows_per_chunk,
            min_similarity: float) -> list[SimilarImages]:
    from .errors import FeatxError
    from .export import ensure_model_file
    from .pipeline import encode_files_through_cache, expand_inputs
    from .runtime import load_model, model_file_for, read_model_info
    from .store import gone_keys, iter_embeddings, model_fingerprints, recorded_paths, rows_at, rows_near

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
    if model is None and len(groups) > 1:  # train-head and map refuse to guess; a search takes the default
        _logger.warning("%s holds %d models (%s): searching %s's embeddings, --model names another", cache,
                        len(groups), ", ".join(groups), group)
    # a query from the cache's own folder: its row is left out of its matches (it would come first, at
    # 1.000), and when the file is unchanged its stored embedding serves, without decoding it again
    results, queries, skipped_rows, query_phashes = [], [], [], []
    folder = recorded_paths(cache, "folder")[group]
    for path, embedding, error, own_row, phash in encode_files_through_cache(
            lambda: load_model(model_file, device=device, engine="onnx", spin=False), expand_inputs(images), cache,
            group, batch_size=batch_size, with_phashes=True):
        results.append(SimilarImages(path, error=error, folder=folder))
        if error is None:
            queries.append(embedding)
            skipped_rows.append(own_row)
            query_phashes.append(phash)
    searched = [r for r in results if r.error is None]
    if not searched:
        return results
    Q = unit_rows(np.stack(queries))  # (n_queries, D)
    # rows of files deleted from the folder (kept until embed --prune) are not matches to open: those the
    # last embed found gone, and those deleted since, asked of the rows a search reaches only (about k of
    # them) and not where the folder is not here at all
    there = os.path.isdir(folder) if folder else False
    gone = set(gone_keys(cache, group))

    def in_folder(key: str) -> bool:
        return key not in gone and (not there or os.path.lexists(os.path.join(folder, key)))

    def rows_of(wanted: list[list[int]], query_of: Sequence[int]) -> list[list[tuple]]:
        """The rows numbered in each of ``wanted`` (for the query ``query_of`` says), each read once, as
        (similarity, key, digest, phash, row number): not those that are not finite numbers or not in the
        folder."""
        numbers = sorted({row for rows in wanted for row in rows})
        keys, embeddings, digests, phashes = rows_at(cache, group, np.array(numbers, dtype=np.int64))
        at = {row: j for j, row in enumerate(numbers)}
        similarities = Q @ unit_rows(embeddings).T if numbers else None
        return [[(float(similarities[i, at[row]]), keys[at[row]], bytes(digests[at[row]]), int(phashes[at[row]]),
                  row) for row in rows if np.isfinite(embeddings[at[row]]).all() and in_folder(keys[at[row]])]
                for i, rows in zip(query_of, wanted)]

    # per query: the rows of its own picture (perceptual hash within NEAR_COPY_BITS of the query's), which
    # may rank anywhere by cosine (a small copy scores low) and are the first match whatever their rank
    own_rows = [set(rows.tolist()) - {skipped_rows[i]}
                for i, rows in enumerate(rows_near(cache, group, np.array(query_phashes, dtype=np.uint64)))]
    own_picture = rows_of([sorted(rows) for rows in own_rows], range(len(Q)))
    # per query: rows as (similarity, key, digest, phash, row number), best first
    kept: list[list[tuple]] = [[] for _ in range(len(Q))]
    start = 0  # the chunk's first row
    damaged: list[str] = []  # keys of rows that are not finite numbers (a damaged file): never matches
    for keys, embeddings, digests, phashes in iter_embeddings(cache, group, rows_per_chunk=rows_per_chunk,
                                                              with_digests=True, with_phashes=True):
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        damaged += [keys[j] for j in bad]
        embeddings[bad] = 0
        rows_T = unit_rows(embeddings).T
        for q0 in range(0, len(Q), _QUERIES_AT_A_TIME):  # (queries, chunk) similarities: 64 MiB at most
            for i, sims in enumerate(Q[q0:q0 + _QUERIES_AT_A_TIME] @ rows_T, start=q0):
                sims[bad] = -np.inf
                if start <= skipped_rows[i] < start + len(keys):
                    sims[skipped_rows[i] - start] = -np.inf
                # the chunk's rows best first beside those kept so far (earlier rows first among equals)
                chunk = ((float(sims[j]), keys[j], bytes(digests[j]), int(phashes[j]), start + int(j))
                         for j in _best_first(sims, 16 * k + 64)
                         if sims[j] > -np.inf and start + j not in own_rows[i] and in_folder(keys[j]))
                pictures = _top_pictures(heapq.merge(kept[i], chunk, key=lambda row: -row[0]), k)
                kept[i] = sorted((row for rows in pictures for row in rows), key=lambda row: -row[0])
        start += len(keys)
    if damaged:
        _logger.warning("%s: %d stored embedding(s) are not finite numbers (NaN or infinity), e.g. that of %s: "
                        "left out of the search; the cache is damaged, embed into a new file", cache, len(damaged),
                        damaged[0])
    chosen = []  # per query: its pictures, each a list of rows, the query's own picture first
    for rows, mine in zip(kept, own_picture):
        pictures = _top_pictures(rows, k)
        chosen.append([sorted(mine, key=lambda row: (-row[0], row[1]))] + pictures[:k - 1] if mine else pictures)
    # a matched picture's other files that ranked below the k-th picture (a small copy scores low): found
    # by perceptual hash, as the query's own picture is, so every picture names all its files, and a
    # search read in chunks of any size names the same ones
    leads = [(i, picture) for i, (pictures, mine) in enumerate(zip(chosen, own_picture))
             for picture in pictures[1 if mine else 0:] if picture[0][3]]
    near = rows_near(cache, group, np.array([picture[0][3] for _, picture in leads], dtype=np.uint64))
    listed = [{row[4] for picture in pictures for row in picture} | {skipped_rows[i]}
              for i, pictures in enumerate(chosen)]
    wanted = [[row for row in rows.tolist() if row not in listed[i]] for (i, _), rows in zip(leads, near)]
    for (i, picture), rows in zip(leads, rows_of(wanted, [i for i, _ in leads])):
        for row in rows:
            if row[4] not in listed[i]:  # a row near two of a query's pictures joins the first
                picture.append(row)
                listed[i].add(row[4])
        picture[1:] = sorted(picture[1:], key=lambda row: (-row[0], row[1]))
    for result, pictures, mine in zip(searched, chosen, own_picture):
        pictures = [_named_by_first_key(picture) for picture in pictures]
        if mine:
            result.query_picture = pictures[0][0][1]
        for first, *others in pictures:
            if first[0] < min_similarity and first[1] != result.query_picture:  # the others come best first
                break
            result.matches.append((first[1], first[0]))
            for row in others:  # the same bytes tie with the first row; a near copy is another file of it
                same_bytes = bool(first[2]) and row[2] == first[2]
                (result.copies if same_bytes else result.near_copies).setdefault(first[1], []).append(row[1])
    return results


def write_similar(results: Sequence[SimilarImages], path: str | os.PathLike) -> int:
    """The matches as a CSV, a row per query and match: query, rank (1 = most similar), match (its file:
    the cache's folder joined to its key), similarity, same_file (';'-joined files with the match's
    bytes), same_picture (its near copies), query_picture ("yes" on the match that is
    the query's own picture), error (a query that could not be read, on a row of its own). Returns how
    many rows."""
    import csv

    n = 0
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "rank", "match", "similarity", "same_file", "same_picture", "query_picture",
                         "error"])
        for result in results:
            if result.error:
                writer.writerow([result.query, "", "", "", "", "", "", result.error])
                n += 1
            for rank, (key, similarity) in enumerate(result.matches, start=1):
                others = [";".join(map(result.path_of, found.get(key, []))) for found in (result.copies,
                                                                                          result.near_copies)]
                writer.writerow([result.query, rank, result.path_of(key), f"{similarity:.6f}", *others,
                                 "yes" if key == result.query_picture else "", ""])
                n += 1
    return n


_QUERIES_AT_A_TIME = 1024
QUERIES_DRAWN, MATCHES_DRAWN = 20, 8  # a sheet of 20 rows of 9 thumbnails at the most


def plot_similar(results: Sequence[SimilarImages], path: Path) -> bool:
    """The queries that have matches (the first QUERIES_DRAWN) as thumbnails, a row each: the query,
    then its matches (the first MATCHES_DRAWN) under their cosine and file name, the query's own
    picture marked. Where the eye tells at once what a list of paths and cosines does not: whether the
    matches are what was looked for. Nothing is drawn (False, said) when no query has a match."""
    from .reports import draw_thumbnails, file_caption

    searched = [r for r in results if r.matches]
    if not searched:
        _logger.warning("no query has a match: %s is not drawn", path)
        return False
    shown = searched[:QUERIES_DRAWN]
    columns = 1 + min(MATCHES_DRAWN, max(len(r.matches) for r in shown))
    tiles: list[tuple[str, str] | None] = []
    for result in shown:
        tiles.append((result.query, f"query\n{file_caption(result.query)}"))
        for key, similarity in result.matches[:columns - 1]:
            mark = ", same picture" if key == result.query_picture else ""
            tiles.append((result.path_of(key), f"{similarity:.3f}{mark}\n{file_caption(key)}"))
        tiles += [None] * (columns - 1 - min(columns - 1, len(result.matches)))
    draw_thumbnails(tiles, columns, path, title=f"{len(shown)} of {len(searched)} queries with matches, each "
                                                f"followed by its matches, the most similar (cosine) first")
    return True


def _best_first(sims: np.ndarray, first: int) -> Iterator[int]:
    """Positions of ``sims`` from the highest, earlier positions first among equals: a stable sort's
    order, of which only the ``first`` best (and any equal to the last of them) are sorted unless more
    are asked for. A search reads about k pictures' rows of each chunk: sorting all 16,384 for each
    query was most of a search's time (1,000 photos against 100,000 rows)."""
    if len(sims) <= first:
        yield from np.argsort(-sims, kind="stable")
        return
    threshold = np.partition(sims, len(sims) - first)[len(sims) - first]
    top = np.flatnonzero(sims >= threshold)
    yield from top[np.argsort(-sims[top], kind="stable")]
    rest = np.flatnonzero(sims < threshold)
    yield from rest[np.argsort(-sims[rest], kind="stable")]


def _named_by_first_key(picture: list[tuple]) -> list[tuple]:
    """A picture's rows with the one that names it first: of those as similar as its best (within 1e-5:
    copies of one file embed alike, and their cosines differ in the last bits as the chunks they were
    read in do), the first by key; the others best first."""
    best = picture[0][0]
    name = min((row for row in picture if row[0] >= best - 1e-5), key=lambda row: row[1])
    return [name] + [row for row in picture if row is not name]


def _top_pictures(rows, k: int) -> list[list[tuple]]:
    """Of (similarity, key, digest, phash, row number) rows given best first, those of the ``k`` most similar
    pictures, a list of rows each, best first. A row joins a picture when it has the bytes of one of its
    rows (copies embed the same bytes, so they tie with their original), or a perceptual hash within
    NEAR_COPY_BITS of its first row's (the same photo resized or re-encoded, ranked anywhere above the
    k-th picture); a row without a digest (b"") or hash (0) is only itself."""
    from .data import NEAR_COPY_BITS

    pictures: list[list[tuple]] = []
    by_digest: dict[bytes, list[tuple]] = {}
    floor = -np.inf
    for row in rows:
        similarity, digest, phash = row[0], row[2], row[3]
        if len(pictures) == k and similarity < floor - 1e-5:
            # below the k-th picture: no copy of a chosen one's bytes can follow (they tie), and a near copy
            # ranked here is left out whatever row follows, so that a search read in chunks of any size
            # (rows_per_chunk) names the same near copies as one read whole
            break
        picture = by_digest.get(digest) if digest else None
        if picture is None and phash:
            picture = next((p for p in pictures if p[0][3] and (p[0][3] ^ phash).bit_count() <= NEAR_COPY_BITS), None)
        if picture is not None:
            picture.append(row)
        elif len(pictures) < k:
            picture = [row]
            pictures.append(picture)
            floor = similarity
        else:
            continue
        if digest:
            by_digest.setdefault(digest, picture)
    return pictures
