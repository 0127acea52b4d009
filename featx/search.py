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


class _PictureFiles:
    """What a search's and a grouping's results say alike of a picture's files: ``self.copies`` and
    ``self.near_copies`` (key -> other keys of its bytes; of it resized or re-encoded) under ``self.folder``."""

    copies: dict[str, list[str]]
    near_copies: dict[str, list[str]]
    folder: str | None

    def path_of(self, key: str) -> str:
        """A file: the cache's folder joined to its key, to open it."""
        return os.path.join(self.folder, key) if self.folder else key

    def _others_text(self, key: str) -> str:
        """``key``'s other files, printable, as a text line ends with them."""
        from .data import printable

        def path(other: str) -> str:
            return printable(self.path_of(other))

        return ((f"  (same file: {', '.join(map(path, self.copies[key]))})" if key in self.copies else "")
                + (f"  (same picture: {', '.join(map(path, self.near_copies[key]))})" if key in self.near_copies
                   else ""))

    def _others_columns(self, key: str) -> list[str]:
        """``key``'s other files as a CSV's same_file and same_picture cells (';'-joined paths)."""
        return [";".join(map(self.path_of, files.get(key, []))) for files in (self.copies, self.near_copies)]


@dataclass
class SimilarImages(_PictureFiles):
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

    def text(self) -> str:
        """The query, then a line per match: its similarity and its file's path (the cache's folder
        joined to its key, to open it), marked when it is the query's own picture, with the copies'
        paths beside it."""
        from .data import printable

        if self.error:
            return f"{printable(self.query)}  FAILED: {self.error}"
        return "\n".join([printable(self.query)] + [
            f"  {similarity:.3f}  {printable(self.path_of(key))}"
            + ("  (same picture as the query)" if key == self.query_picture else "") + self._others_text(key)
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
    from .store import gone_keys, iter_embeddings, model_fingerprints, recorded_paths, repair_said, rows_at, rows_near

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
                        "left out of the search; the cache is damaged: %s", cache, len(damaged), damaged[0],
                        repair_said(cache, folder))
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


def searched_its_own_folder(results: Sequence[SimilarImages]) -> bool:
    """Whether every query is a file under the folder the cache follows (the folder searched against its
    own cache: a pair of look-alikes is then listed under both its files, where --groups lists it once)."""
    def under(query: str, folder: str | None) -> bool:
        try:
            return bool(folder) and os.path.commonpath([os.path.realpath(query), os.path.realpath(folder)]) \
                == os.path.realpath(folder)
        except ValueError:  # another drive
            return False

    return bool(results) and all(under(r.query, r.folder) for r in results)


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
                writer.writerow([result.query, rank, result.path_of(key), f"{similarity:.6f}",
                                 *result._others_columns(key),
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


# 21 photos' edits (crops of 10-20 %, 40 % brighter, turned 8 degrees, mirrored) at median cosines 0.91-0.98 to
# their photo with Lite0, distinct photos up to 0.49: python benchmarks/look_alikes.py
LOOK_ALIKE_COSINE = 0.85


@dataclass
class LookAlikes(_PictureFiles):
    """Pictures of a cache that look alike, or one picture stored in several files (:func:`look_alike_groups`):
    ``pictures`` as (key, its highest cosine to another picture of the group; -inf for a group of one), in
    the folder's order; each picture's other files with its bytes are its ``copies``, those of it resized
    or re-encoded its ``near_copies``."""

    pictures: list[tuple[str, float]]
    copies: dict[str, list[str]] = field(default_factory=dict)
    near_copies: dict[str, list[str]] = field(default_factory=dict)
    folder: str | None = None

    def files(self) -> list[tuple[str, str]]:
        """(key, how it stands in the group) for every file: a picture's (its cosine, as text; blank in a
        group of one), then its copies' ("same file") and near copies' ("same picture")."""
        return [entry for key, similarity in self.pictures
                for entry in [(key, _cosine_text(similarity))] + [(other, "same file") for other in self.copies.get(key, [])]
                + [(other, "same picture") for other in self.near_copies.get(key, [])]]

    def text(self) -> str:
        """A line for the group, then one per picture: its highest cosine to another of them and its path,
        with its copies' paths beside it."""
        from .data import printable

        n = len(self.pictures)
        return "\n".join([(f"{n} pictures alike" if n > 1 else "1 picture") + f" ({len(self.files())} files)"] + [
            f"  {_cosine_text(similarity):5s}  {printable(self.path_of(key))}" + self._others_text(key)
            for key, similarity in self.pictures])


def look_alike_groups(
    cache: str | os.PathLike,
    *,
    min_similarity: float = LOOK_ALIKE_COSINE,
    model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    progress: bool = False,
    device: str | None = "auto",
) -> list[LookAlikes]:
    """What a folder holds more than once, in groups, each picture in one group at most: pictures that look
    alike (every pair at cosine ``min_similarity`` or more is joined, and so are pairs of pairs: a group
    may hold two pictures less alike, each close to a third), and a picture's files (the same bytes, or
    resized or re-encoded: by perceptual hash), which count as one picture, named beside it; a picture
    alike no other is a group when it is stored in several files. Groups in the folder's order.

    Every file is compared with every other (a picture is alike another when any of its files is: its
    small copy alone may not be): a cache of n files costs n²/2 dot products (20,000 of Lite0's 1,280-d
    embeddings: 5 s on a 2-core CPU, ``benchmarks/look_alikes.py``), its embeddings held in memory (5 KB
    a file), on ``device`` too (auto: a GPU when one is visible). Rows not finite or of files deleted from
    the folder are left out.

    Args:
        model: the cache's model group (its name, or the .onnx file by its fingerprint); needed only when
            the cache holds several.
        output: also write the groups to this CSV (:func:`write_look_alikes`); ``sheet``: draw them as
            thumbnails in this PNG, a row per group (:func:`plot_look_alikes`).
    """
    from .data import walk_sort_key
    from .errors import check_output_file
    from .runtime import resolve_device
    from .store import gone_keys, iter_embeddings, load_digests, picture_numbers, recorded_paths, repair_said

    device = resolve_device(device)
    check_output_file(output, example="look-alikes.csv")
    check_output_file(sheet, example="look-alikes.png")
    group = _group_of(cache, model)
    folder = recorded_paths(cache, "folder")[group]
    keys, digests, phashes = load_digests(cache, group)
    gone = set(gone_keys(cache, group))
    there = os.path.isdir(folder) if folder else False
    usable = np.array([key not in gone and (not there or os.path.lexists(os.path.join(folder, key)))
                       for key in keys], dtype=bool)
    picture = picture_numbers(digests, phashes)
    rows, parts, start = [], [], 0  # the usable rows' unit embeddings, read a chunk at a time
    for _, chunk in iter_embeddings(cache, group):
        wanted = np.flatnonzero(usable[start:start + len(chunk)])
        finite = np.isfinite(chunk[wanted]).all(axis=1)
        rows.append(start + wanted[finite])
        parts.append(unit_rows(chunk[wanted[finite]]))
        start += len(chunk)
        if not finite.all():
            _logger.warning("%s: %d stored embedding(s) are not finite numbers (NaN or infinity): left out; the "
                            "cache is damaged: %s", cache, int((~finite).sum()), repair_said(cache, folder))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    E = np.concatenate(parts) if len(rows) else np.zeros((0, 1), np.float32)
    by_order = np.array(sorted(range(len(rows)), key=lambda i: walk_sort_key(keys[rows[i]])), dtype=np.int64)
    rows, E = rows[by_order], E[by_order]  # the folder's order: a group lists its pictures, a picture its files so
    # every file compared, not one per picture: a picture's small copy (the first file of it, or the only one
    # left) is less alike the others than its original (a third-size copy of a photo: cosine 0.75)
    component, nearest = _alike_components(E, min_similarity, progress, picture[rows], device)
    files: dict[int, list[int]] = {}  # picture -> its rows, the first in the folder's order first
    best: dict[int, float] = {}  # picture -> its highest cosine to another picture's file
    for row, cosine in zip(rows.tolist(), nearest.tolist()):
        files.setdefault(int(picture[row]), []).append(row)
        best[int(picture[row])] = max(best.get(int(picture[row]), -np.inf), cosine)
    results = []
    for members in np.split(np.argsort(component, kind="stable"),
                            np.flatnonzero(np.diff(np.sort(component))) + 1) if len(rows) else []:
        if len(members) < 2:
            continue  # a picture alike no other, stored once
        pictures = list(dict.fromkeys(int(picture[rows[i]]) for i in members))  # in the folder's order
        found = LookAlikes([(keys[files[p][0]], best[p]) for p in pictures], folder=folder)
        for p in pictures:
            first, *others = files[p]
            for row in others:
                same_bytes = bool(digests[first]) and digests[row] == digests[first]
                (found.copies if same_bytes else found.near_copies).setdefault(keys[first], []).append(keys[row])
        results.append(found)
    results.sort(key=lambda found: walk_sort_key(found.pictures[0][0]))
    if output is not None:
        write_look_alikes(results, output)
    if sheet is not None:
        plot_look_alikes(results, Path(sheet), min_similarity)
    return results


def look_alikes_summary(groups: Sequence[LookAlikes], min_similarity: float) -> str:
    """How many groups :func:`look_alike_groups` found and of what, in a line (two when one group is large:
    pictures alike in a chain join, and a higher cosine splits them)."""
    alike = [g for g in groups if len(g.pictures) > 1]
    largest = max((len(g.pictures) for g in alike), default=0)
    stored_twice = len(groups) - len(alike)
    line = (f"{len(alike)} group{'s' if len(alike) != 1 else ''} of pictures alike at cosine {min_similarity:g} or more "
            f"({sum(len(g.pictures) for g in alike)} pictures" + (f", the largest {largest}" if len(alike) > 1 else "")
            + f"), {stored_twice} more picture{'s' if stored_twice != 1 else ''} stored in several files")
    if largest >= 100:
        line = (f"a group of {largest} pictures: pictures each alike the next join; a higher --min-similarity "
                f"splits it\n{line}")
    return line


def _cosine_text(similarity: float, decimals: int = 3) -> str:
    return f"{similarity:.{decimals}f}" if np.isfinite(similarity) else ""


_PAIRS_HELD = 10_000_000  # 160 MB of pairs


def _alike_components(E: np.ndarray, min_similarity: float, progress: bool, same: np.ndarray,
                      device: str = "cpu", library: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows ``E`` (m, d): a group number per row, shared by rows at cosine ``min_similarity`` or more,
    by rows of one picture (``same``: int per row) whatever their cosine, and by their chains (scipy's
    connected components); and each row's highest cosine to a row of another picture (-inf: none at
    ``min_similarity``). Similarities a block of rows at a time against the rows after it, by ``library``:
    numpy, or torch on ``device`` (the default on a GPU, where the n²/2 dot products take a fraction of the
    time). On a CPU numpy, though torch ran them a little faster (20,000 rows of 1,280: 3.9-4.5 against
    4.8-5.2 s, 2-core Xeon): importing torch costs 1.5-2 s, so a small cache's groups took 2.4 s against 0.5."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .pipeline import _progress_bar

    m = len(E)
    pairs_at_least = _similar_pairs(E, min_similarity, device, library or ("numpy" if device == "cpu" else "torch"))

    def components(pairs: np.ndarray) -> np.ndarray:
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
        return connected_components(graph, directed=False)[1]

    _, first, picture = np.unique(same, return_index=True, return_inverse=True)  # joined through its first row
    pairs = [np.stack([np.arange(m), first[picture.ravel()]], axis=1)]
    held = m  # pairs held: past _PAIRS_HELD (a low cosine on a large cache) each group is kept as a tree instead
    nearest = np.full(m, -np.inf, dtype=np.float32)
    block = max(1, min(1024, 2 ** 25 // max(m, 1)))  # (block, m) similarities: 128 MiB at most
    bar = _progress_bar(m * (m - 1) // 2, progress, desc="look-alikes", unit="pair")
    for a in range(0, m, block):
        i, j, cosines = pairs_at_least(a, block)  # each block against itself and the rows after it
        keep = (j > i) & (same[a + i] != same[a + j])  # each pair once, not two files of one picture
        i, j, cosines = i[keep], j[keep], cosines[keep]
        np.maximum.at(nearest, a + i, cosines)
        np.maximum.at(nearest, a + j, cosines)
        pairs.append(np.stack([a + i, a + j], axis=1))
        held += len(i)
        if held > _PAIRS_HELD:
            component = components(np.concatenate(pairs))
            _, root = np.unique(component, return_index=True)
            tree = np.stack([np.arange(m), root[component]], axis=1)
            pairs, held = [tree[tree[:, 0] != tree[:, 1]]], m
        bar.update(sum(m - 1 - row for row in range(a, min(a + block, m))))
    bar.close()
    return components(np.concatenate(pairs)), nearest


def _similar_pairs(E: np.ndarray, min_similarity: float, device: str, library: str):
    """``pairs_at_least(a, block)``: (i, j, cosine) of rows ``a + i`` and ``a + j`` of ``E`` at ``min_similarity``
    or more, for i < ``block``, with numpy or torch on ``device``; the pairs come back as numpy arrays."""
    if library == "numpy":
        def pairs_at_least(a: int, block: int):
            sims = E[a:a + block] @ E[a:].T
            i, j = np.nonzero(sims >= min_similarity)
            return i, j, sims[i, j]

        return pairs_at_least
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(E, dtype=np.float32))
    try:
        rows = rows.to(device)
    except torch.cuda.OutOfMemoryError:  # the cache's rows are held whole: a GPU may not take them all
        _logger.warning("%d embeddings of %d values do not fit in %s's free memory: compared on the CPU", len(E),
                        E.shape[1], device)

    def pairs_at_least(a: int, block: int):
        with torch.inference_mode():
            sims = rows[a:a + block] @ rows[a:].T
            i, j = torch.nonzero(sims >= min_similarity).unbind(1)
            return i.cpu().numpy(), j.cpu().numpy(), sims[i, j].cpu().numpy()

    return pairs_at_least


def _group_of(cache: str | os.PathLike, model: str | os.PathLike | None) -> str:
    """The cache's model group named by ``model`` (a group name, or an .onnx file by its fingerprint), or its only one."""
    from .errors import FeatxError
    from .export import is_model_file
    from .runtime import read_model_info
    from .store import model_fingerprints

    groups = model_fingerprints(cache)
    if not groups:
        raise FeatxError(f"{cache} holds no featx embeddings (make them with: featx embed FOLDER -o {cache})")
    if model is None and len(groups) == 1:
        return next(iter(groups))
    if model is None:
        raise FeatxError(f"{cache} holds {len(groups)} models ({', '.join(groups)}): name one with --model")
    if str(model) in groups:
        return str(model)
    if is_model_file(model):
        fingerprint = read_model_info(model).fingerprint
        for name, theirs in groups.items():
            if theirs == fingerprint:
                return name
    raise FeatxError(f"{cache} holds no embeddings of {model}; it has {', '.join(groups)} (--model names one)")


def write_look_alikes(groups: Sequence[LookAlikes], path: str | os.PathLike) -> int:
    """The groups as a CSV, a row per picture: group (1, 2, …), picture (its file: the cache's folder
    joined to its key), similarity (its highest cosine to another picture of the group), same_file and
    same_picture (';'-joined files of it: the same bytes; resized or re-encoded). Returns how many rows."""
    import csv

    n = 0
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "picture", "similarity", "same_file", "same_picture"])
        for number, found in enumerate(groups, start=1):
            for key, similarity in found.pictures:
                writer.writerow([number, found.path_of(key), _cosine_text(similarity, 6), *found._others_columns(key)])
                n += 1
    return n


def plot_look_alikes(groups: Sequence[LookAlikes], path: Path, min_similarity: float) -> bool:
    """The groups (the first QUERIES_DRAWN) as thumbnails, a row each (its first MATCHES_DRAWN + 1 files),
    each under its highest cosine within the group (a copy: how it copies) and file name. Nothing is drawn
    (False, said) without a group."""
    from .reports import draw_thumbnails, file_caption

    if not groups:
        _logger.warning("no pictures look alike, none is stored twice: %s is not drawn", path)
        return False
    shown = groups[:QUERIES_DRAWN]
    columns = min(MATCHES_DRAWN + 1, max(len(found.files()) for found in shown))
    tiles: list[tuple[str, str] | None] = []
    for found in shown:
        files = found.files()[:columns]
        tiles += [(found.path_of(key), f"{how}\n{file_caption(key)}") for key, how in files]
        tiles += [None] * (columns - len(files))
    draw_thumbnails(tiles, columns, path, title=f"{len(shown)} of {len(groups)} groups, a row each: pictures alike "
                                                f"(cosine {min_similarity:g} or more to another of the group) and "
                                                "each picture's files")
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
