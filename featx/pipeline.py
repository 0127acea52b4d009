"""Images -> embeddings: classify a few files, or embed a whole folder into the HDF5 cache.

``embed_folder`` streams the folder (data), decodes in worker threads ahead of the model
(a bounded window of batches, so memory does not grow with the folder), runs the engine
(runtime) and commits whole batches (store). Killed at any point, the same call resumes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .backbones import DEFAULT_BACKBONE
from .data import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DecodedBatch, FileEntry, WalkFailure, class_names_of, \
    content_is_image, file_digest, folder_to_walk, is_glob_pattern, is_passed_over, load_batch, load_image, \
    perceptual_hashes, printable, walk_images, walk_sort_key
from .errors import FeatxError, ImageError, ModelFileError, check_output_file
from .export import ensure_model_file
from .runtime import BackoffEncoder, Device, EngineName, auto_batch_size, cuda_device_count, default_batch_size, \
    is_cuda, load_model, read_model_info, resolve_device
from .store import EmbeddingStore, check_store_path, stored_rows_of

_logger = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


UNLIKE_TRAINING = "(unlike the training images: a guess)"


@dataclass
class Classification:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first; empty when it failed
    error: str | None = None  # why the image could not be classified
    phash: int = 0  # its perceptual hash, where iter_classify was asked for it (0: not taken)
    # a classifier that knows its training images' class means (export_classifier's of such a head): the
    # image's cosine to the nearest, and whether that is under what 99% of the training images reach
    class_mean_cosine: float | None = None
    unlike_training: bool | None = None
    marks_unlike: bool = False  # made by such a classifier: its CSV has the two columns above

    @property
    def key(self) -> str:
        """The row's name in a CSV (:func:`write_predictions`): the path as given."""
        return self.path

    def line(self) -> str:
        if self.error:
            return f"{printable(self.path)}  FAILED: {self.error}"
        return (f"{printable(self.path)}  " + "  ".join(f"{name} {p * 100:.1f}%" for name, p in self.top)
                + (f"  {UNLIKE_TRAINING}" if self.unlike_training else ""))


def classify(
    images: Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    top: int = 5,
    device: Device = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    output: str | os.PathLike | None = None,
) -> list[Classification]:
    """The model's classes (ImageNet's, or an ``export_classifier`` file's own) of image files, and of
    every image under the folders among them (in walk order).
    A bad image is a Classification with ``error``, never an exception: the others are still classified.
    With ``output``, rows go to a CSV as they are made (the columns of :func:`write_predictions`; a run
    stopped part-way keeps the rows written). For a folder too large to hold its rows, use
    :func:`iter_classify`.

    Example:
        >>> classify(["coffee.png"])[0].top[0]
        ('espresso', 0.95...)
    """
    return collect_rows(iter_classify(images, model=model, weights=weights, top=top, device=device,
                                      batch_size=batch_size, progress=progress), output, top=top)


def collect_rows(rows: Iterable, output: str | os.PathLike | None, *, top: int) -> list:
    """Every row of ``rows`` in a list; with ``output``, each also written to that CSV as it comes."""
    if not output:
        return list(rows)
    kept: list = []
    write_predictions((kept.append(row) or row for row in rows), output, top=top)
    return kept


def iter_classify(
    images: Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    top: int = 5,
    device: Device = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    with_phashes: bool = False,
) -> Iterator[Classification]:
    """:func:`classify`'s rows one at a time, as each batch is classified: a folder of any size runs in
    bounded memory, and its first rows come while the rest is decoded. ``with_phashes``: each row's
    ``phash`` is the image's perceptual hash (for evaluate, which leaves out pictures a model trained on)."""
    if top < 1:
        raise FeatxError(f"top={top}: ask for at least one class")
    engine = load_model(model, weights=weights, device=device, engine="onnx", spin=False)
    info = engine.info
    if not info.has_logits:
        raise ModelFileError(f"{engine.path}: this model has no ImageNet classifier (no logits output)")
    # a merged classifier of a head with class means: its images unlike the head's training images marked
    means = read_model_info(engine.path).class_means if info.typical_cosine is not None else None
    marks = means is not None
    for path, embedding, logits, error, phash in encode_files(engine, expand_inputs(images), batch_size=batch_size,
                                                              progress=progress, with_phashes=with_phashes):
        if error:
            yield Classification(path, [], error, marks_unlike=marks)
            continue
        p = class_probabilities(info, logits[None])[0]
        cosine = float(np.max(means @ (embedding / np.linalg.norm(embedding)))) if marks else None
        yield Classification(path, [(info.class_names[j], float(p[j])) for j in np.argsort(-p)[:top]], phash=phash,
                             class_mean_cosine=cosine, unlike_training=cosine < info.typical_cosine if marks else None,
                             marks_unlike=marks)


def write_predictions(rows: Iterable, path: str | os.PathLike, *, top: int = 3) -> int:
    """Write classification or prediction rows (``key``, ``top``, ``error``, and a multi-label head's
    ``labels``) to a CSV as they come (flushed every 256 rows, so a run stopped part-way
    keeps what it wrote); returns how many. Columns: key, class_i/probability_i for i in 1..top,
    labels (multi-label heads, ';'-joined), a head's rows also class_mean_cosine and unlike_training
    (true, false; empty for a head saved without class means), error (a file that could not be read)."""
    import csv
    import itertools

    check_output_file(path, example="predictions.csv")  # before the first row: nothing has run yet
    rows = iter(rows)
    # the first row is made before the file is opened: a run refused at its start (a head of another
    # model, a missing folder) leaves an earlier CSV at this path as it was
    first = list(itertools.islice(rows, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        header = ["key"] + [c for i in range(1, top + 1) for c in (f"class_{i}", f"probability_{i}")]
        # a head's rows: how like its training images each image is (classify's model has no such thing)
        typicality = bool(first) and first[0].marks_unlike
        writer.writerow(header + ["labels"] + (["class_mean_cosine", "unlike_training"] if typicality else [])
                        + ["error"])
        for row in itertools.chain(first, rows):
            cells = [c for name, p in row.top for c in (name, f"{p:.6f}")]
            cells += [""] * (2 * top - len(cells))
            cells.append(";".join(getattr(row, "labels", None) or []))
            if typicality:
                cells += ["" if row.class_mean_cosine is None else f"{row.class_mean_cosine:.4f}",
                          "" if row.unlike_training is None else str(row.unlike_training).lower()]
            writer.writerow([row.key, *cells, row.error or ""])
            n += 1
            if n % 256 == 0:
                f.flush()
    return n


def class_probabilities(info, scores: np.ndarray) -> np.ndarray:
    """(n, n_classes) probabilities from a model's class scores: softmax of logits; a classifier file's
    probabilities as they are (a multi-label head's do not sum to 1)."""
    return scores if info.class_scores == "probabilities" else softmax(scores)


def named_inputs(items: Sequence[str | os.PathLike]) -> list[str]:
    """The names a command line gives, a pattern ('photos/*.jpg' quoted) as what it matches, as the shell
    would have given them; folders are left as they are (expand_inputs walks them)."""
    import glob

    names: list[str] = []
    for item in items:
        text = os.fspath(item)
        matched = (glob.glob(text, recursive=True) if isinstance(text, str) and is_glob_pattern(text)
                   and not os.path.lexists(text) else [])
        names.extend(sorted(matched, key=walk_sort_key) or [text])
    return names


WHAT_FEATX_READS = (f"featx reads {' '.join(sorted(IMAGE_EXTENSIONS))}, and files without an extension whose "
                    "content is an image")


def warn_no_images(folder: str | os.PathLike) -> None:
    """A folder that gave no image: a wrong folder, most likely; said, not a silent run with no rows."""
    _logger.warning("%s: no image files found (%s)", printable(os.fspath(folder)), WHAT_FEATX_READS)


def expand_inputs(items: Sequence[str | os.PathLike]) -> list[str]:
    """Image files as given, and for a folder every image under it, in walk order (sorted by path). A
    name that is no file but a pattern ('photos/*.jpg' quoted, or typed in Windows' cmd, which expands
    none) stands for what it matches, as the shell would have expanded it (``**`` recursive)."""
    paths: list[str] = []
    for text in named_inputs(items):
        if os.path.isdir(text):
            found = len(paths)
            for entry in walk_images(text):
                if isinstance(entry, FileEntry):
                    paths.append(entry.path)
                else:
                    _logger.warning("skipped %s: %s", printable(os.path.join(text, entry.key)), entry.reason)
            if len(paths) == found:
                warn_no_images(text)
        else:
            paths.append(str(text))
    return paths


def encode_files_through_cache(load_engine, paths: Sequence[str], cache, group: str, *,
                                batch_size: int | None = None, progress: bool = False,
                                with_phashes: bool = False) -> Iterator:
    """(path, embedding, why it failed, its row in the cache or -1, perceptual hash) for each path in
    order, as :func:`encode_files` gives them, but a file under the folder ``cache`` follows whose
    ``group`` row is current (same size and mtime, as embed would skip it) takes its stored embedding
    (and stored hash): not decoded, and ``load_engine()`` is called only if some file needs encoding.
    The hash is 0 without ``with_phashes``, or where unknown. Nothing is written to the cache."""
    own_rows, stored, stored_phashes = stored_rows_of(cache, group, paths)
    to_encode = [path for i, path in enumerate(paths) if i not in stored]
    encoded = iter(encode_files(load_engine(), to_encode, batch_size=batch_size, progress=progress,
                                with_phashes=with_phashes) if to_encode else ())
    for i, path in enumerate(paths):
        if i in stored:
            yield path, stored[i], None, own_rows[i], stored_phashes[i] if with_phashes else 0
        else:
            _, embedding, _, error, phash = next(encoded)
            yield path, embedding, error, own_rows.get(i, -1), phash
    for _ in encoded:  # nothing is left: this ends it, so that its progress bar shows the last batch and closes
        pass


_FAILURES_SAID = 20  # one line each while a run goes; past it the summary counts them and info lists them


def _say_failure(key: str, reason: str, said_before: int, out) -> None:
    """A file the run skips, logged as it happens, up to ``_FAILURES_SAID`` of them: a folder of
    scraped images with thousands of broken ones would otherwise bury the run under their lines."""
    if said_before < _FAILURES_SAID:
        _logger.warning("skipped %s: %s", printable(key), reason)
    elif said_before == _FAILURES_SAID:
        _logger.warning("more files fail: not said one by one from here on; the summary counts them and "
                        "`featx info %s --failures` lists every one", out)


# A file whose embedding is NaN or infinite is a failure of that file: stored, one such row would make
# train-head, map and evaluate refuse the whole cache
NOT_FINITE_OUTPUT = "the model's output for it is not finite numbers (NaN or infinity: an fp16 overflow?)"


def _without_non_finite(emb: np.ndarray, decoded: DecodedBatch) -> tuple[np.ndarray, DecodedBatch]:
    """The batch's embeddings (n_ok, D) and its DecodedBatch without the rows that are not finite
    numbers, which become failures (NOT_FINITE_OUTPUT) of their files."""
    finite = np.isfinite(emb).all(axis=1)
    if finite.all():
        return emb, decoded
    keep = np.flatnonzero(finite)
    failed = sorted(decoded.failed + [(decoded.ok[j], NOT_FINITE_OUTPUT) for j in np.flatnonzero(~finite)])
    return emb[keep], dataclasses.replace(
        decoded, ok=[decoded.ok[j] for j in keep], failed=failed,
        digests=[decoded.digests[j] for j in keep] if decoded.digests else decoded.digests,
        phashes=None if decoded.phashes is None else decoded.phashes[keep])


def encode_files(engine, paths: Sequence[str], *, batch_size: int | None = None, progress: bool = False,
                 workers: int | None = None, with_phashes: bool = False) -> Iterator:
    """(path, embedding, logits or None, None, phash) for each path in order, or (path, None, None, why it
    failed, 0): decoded and encoded in batches with a loaded engine; a bad file is never raised. Batches
    are decoded ahead in ``workers`` threads (``default_workers()`` unless given) while the engine runs;
    only a few batches are held at a time, so a folder of any size runs in bounded memory.
    ``batch_size``: the device's default (``default_batch_size``) unless given. ``phash``: the image's
    perceptual hash with ``with_phashes`` (taken in the decode thread, from the pixels the model gets),
    else 0."""
    batch_size = batch_size or default_batch_size(engine.device)
    workers = default_workers() if workers is None else workers
    chunks = (paths[start:start + batch_size] for start in range(0, len(paths), batch_size))
    bar = _progress_bar(len(paths), progress)
    def decode(chunk: list[str]) -> DecodedBatch:
        decoded = load_batch(chunk, engine.info.preprocess, with_digests=False)  # nothing is stored
        if with_phashes:
            decoded.phashes = perceptual_hashes(decoded.images)
        return decoded

    try:
        for chunk, decoded in _ahead(chunks, decode, workers):
            rows: list = [(None, None, None, 0)] * len(chunk)
            for k, reason in decoded.failed:
                rows[k] = (None, None, reason, 0)
            if decoded.ok:
                out = engine.encode(decoded.images)
                finite = np.isfinite(out.embedding).all(axis=1)
                if out.logits is not None:
                    finite &= np.isfinite(out.logits).all(axis=1)
                for j, k in enumerate(decoded.ok):
                    rows[k] = ((out.embedding[j], None if out.logits is None else out.logits[j], None,
                                int(decoded.phashes[j]) if with_phashes else 0) if finite[j]
                               else (None, None, NOT_FINITE_OUTPUT, 0))
            for path, row in zip(chunk, rows):
                yield (path, *row)
            bar.update(len(chunk))
    finally:
        bar.close()


def perceptual_hashes_of_files(paths: Sequence[str], cfg, *, progress: bool = False, workers: int | None = None,
                               batch_size: int = 32) -> np.ndarray:
    """uint64 (n,): each file's perceptual hash at the model's input (``cfg``), as the cache keeps it; 0 for
    a file that cannot be decoded (never a near copy). For fine_tune's split, which needs every file's
    hash before anything trains. Decoded in ``workers`` threads (``default_workers()`` unless given)."""
    hashes = np.zeros(len(paths), dtype=np.uint64)
    for positions, batch_hashes in _hashes_by_batch(paths, cfg, progress=progress, desc="hashing for near copies",
                                                    workers=workers, batch_size=batch_size):
        hashes[positions] = batch_hashes
    return hashes


def _hashes_by_batch(paths: Sequence[str], cfg, *, progress: bool, desc: str, workers: int | None = None,
                     batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in ``paths``, their uint64 perceptual hashes) for each batch of files that decoded, in order."""
    workers = default_workers() if workers is None else workers
    bar = _progress_bar(len(paths), progress, desc=desc)

    def decode(start: int) -> DecodedBatch:
        return load_batch(paths[start:start + batch_size], cfg, with_digests=False)

    try:
        for start, decoded in _ahead(iter(range(0, len(paths), batch_size)), decode, workers):
            yield start + np.asarray(decoded.ok, dtype=np.int64), perceptual_hashes(decoded.images)
            bar.update(len(decoded.ok) + len(decoded.failed))
    finally:
        bar.close()


def hash_unhashed_rows(store: EmbeddingStore, seen: set[str], cfg, stats: RunStats, *, workers: int | None = None,
                       progress: bool = False) -> None:
    """Give a perceptual hash to each row of a file the walk met that has none: rows embedded by a featx
    from before the cache kept hashes, and rows moved onto such a row. Their files are decoded once more,
    not embedded (the walk has just found them unchanged), so that train-head, evaluate and similar find
    their near copies without the folder being embedded again. Each batch is written as it is hashed: a
    killed run keeps what it did. A black image hashes to 0 as well and is hashed again each run (0.05 ms)."""
    unhashed = store.phashes() == 0
    if not unhashed.any():  # the usual case: a re-run does not pay for the key map below
        return
    rows_by_key = store.done()
    rows = np.array(sorted(rows_by_key[key][0] for key in seen if key in rows_by_key), dtype=np.int64)
    rows = rows[unhashed[rows]] if len(rows) else rows
    if not len(rows):
        return
    key_of_row = {row: key for key, (row, _, _) in rows_by_key.items()}
    paths = [os.path.join(store.folder, key_of_row[row]) for row in rows]
    _logger.info("%d rows have no perceptual hash (embedded before featx kept them): hashing their files",
                 len(rows))
    for positions, hashes in _hashes_by_batch(paths, cfg, progress=progress, workers=workers,
                                              desc="hashing older rows for near copies"):
        store.set_phashes(rows[positions], hashes)
        stats.n_hashed += int(np.count_nonzero(hashes))


def embed_images(
    images: Sequence[str | os.PathLike | bytes | np.ndarray | Image.Image],
    *,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    batch_size: int | None = None,
    device: Device = "auto",
    engine: EngineName = "onnx",
    workers: int | None = None,
) -> np.ndarray:
    """Embeddings of images, in memory: files (paths, or their bytes), PIL images or arrays (uint8 RGB;
    see :func:`featx.data.as_rgb` for the others), each made the same picture as its file would be.
    Returns float32 (n, embed_dim); raises ImageError on a bad file or array.
    ``workers``: decode threads running ahead of the model (``default_workers()`` unless given)."""
    from .data import as_rgb, preprocess_image

    workers = default_workers() if workers is None else workers
    runner = load_model(model, weights=weights, device=device, engine=engine, spin=workers == 0)
    cfg = runner.info.preprocess
    batch_size = batch_size or default_batch_size(runner.device)
    out = np.empty((len(images), runner.info.embed_dim), dtype=np.float32)

    def prepared(i: int) -> np.ndarray:
        img = images[i]
        try:
            if isinstance(img, (str, os.PathLike, bytes, bytearray)):
                return load_image(img, cfg)
            return preprocess_image(as_rgb(img), cfg)
        except ImageError as e:  # which one of the images: its path, else its place in the list
            name = os.fspath(img) if isinstance(img, (str, os.PathLike)) else f"images[{i}] ({type(img).__name__})"
            raise ImageError(f"{name}: {e}") from None

    def decode(start: int) -> np.ndarray:
        return np.stack([prepared(i) for i in range(start, min(start + batch_size, len(images)))])

    for start, batch in _ahead(iter(range(0, len(images), batch_size)), decode, workers):
        out[start:start + len(batch)] = runner.encode(batch).embedding
    return out


@dataclass
class RunStats:
    """Summary of one ``embed_folder`` run."""

    out: str
    model: str
    n_embedded: int = 0
    n_cached: int = 0
    n_failed: int = 0
    n_failed_before: int = 0  # failures recorded by an earlier run, file unchanged: not retried
    n_pruned: int = 0
    repaired: list[str] = field(default_factory=list)  # keys of damaged rows dropped by --repair, embedded again
    # new paths whose bytes the cache had embedded under another path (moved, renamed, copied): their
    # embeddings were reused, not recomputed
    n_moved: int = 0
    n_duplicates: int = 0  # files with the bytes of another file of this run: embedded once, row shared
    n_hashed: int = 0  # rows from before the cache kept perceptual hashes, given theirs this run
    seconds: float = 0.0
    load_seconds: float = 0.0  # model export/load/compile before the first image
    engine: str = ""  # the engine(s) that ran, with their devices
    batch_size: int = 0  # images per engine call it started at (the device's default unless asked)
    backoffs: list[int] = field(default_factory=list)  # batch sizes lowered to after out-of-memory
    decoded_by: dict[str, int] = field(default_factory=dict)  # files per decoder: "gpu" (nvJPEG), "cpu"
    jpeg_library: str = ""  # what called nvJPEG (torchcodec, torchvision), with GPU decode
    failures: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # stored keys whose file is gone (kept unless pruned)
    # stored keys whose file has changed into one that cannot be read (a damaged copy, a sync part-way):
    # their rows embed bytes no longer there, so they are left out as a deleted file's are (kept unless pruned)
    unreadable_now: list[str] = field(default_factory=list)
    folder: str = ""  # the folder the cache follows: its keys are paths relative to it
    subfolder: str = ""  # the part of it this run embedded, '/'-separated ("": all of it)

    @property
    def n_deleted(self) -> int:
        return len(self.deleted)

    @property
    def gone(self) -> list[str]:
        """Keys of the rows that no longer stand for a file of the folder: deleted, or unreadable now."""
        return sorted({*self.deleted, *self.unreadable_now}, key=os.fsencode)

    @property
    def images_per_second(self) -> float:
        """Over the whole run, loading the model included."""
        return self.n_embedded / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """After the model was loaded: what a long run approaches."""
        busy = self.seconds - self.load_seconds
        return self.n_embedded / busy if busy > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.n_embedded} embedded, {self.n_cached} already cached, {self.n_failed} failed"
            + (f", {self.n_moved} moved, renamed or copied (embeddings reused)" if self.n_moved else "")
            + (f", {self.n_duplicates} identical to another file (embedded once)" if self.n_duplicates else "")
            + (f" ({self.n_failed_before} failed before, unchanged: --retry-failed tries them again)"
               if self.n_failed_before else "")
            + (f", {self.n_hashed} older rows given a perceptual hash" if self.n_hashed else "")
            + (f", {len(self.repaired)} damaged row{'s' if len(self.repaired) > 1 else ''} dropped to be embedded "
               "again (--repair)" if self.repaired else "")
            + (f", {self.n_deleted} deleted from the folder" + (" (pruned)" if self.n_pruned else
               " (their rows stay, left out of heads and maps; --prune removes them)") if self.n_deleted else "")
            + (self._unreadable_now_said() if self.unreadable_now else "")
            + f" in {self.seconds:.1f} s ({self.load_seconds:.1f} s loading the model)"
            + (f", {self.steady_images_per_second:.1f} images/s" if self.n_embedded else "")
            + f" -> {self.out}" + (f" (as {self.subfolder}/ of {self.folder})" if self.subfolder else "")
            + f" [{self.model}"
            + (f", {self.engine}" if self.engine else "") + (f", batch {self.batch_size}" if self.batch_size else "")
            + "]"
            + (f"; out of memory: batch size lowered to {self.backoffs[-1]}" if self.backoffs else "")
            + ("; decoded: " + ", ".join(f"{n} by {f'nvJPEG ({self.jpeg_library})' if k == 'gpu' else 'CPU workers'}"
                                         for k, n in sorted(self.decoded_by.items(), reverse=True))
               if "gpu" in self.decoded_by else "")
            + (f"; no image files found ({WHAT_FEATX_READS})" if self.found_nothing else "")
        )

    def _unreadable_now_said(self) -> str:
        one = len(self.unreadable_now) == 1
        return (f", {len(self.unreadable_now)} embedded before and unreadable now ("
                + ("its earlier row" if one else "their earlier rows")
                + (" pruned)" if self.n_pruned else
                   f" left out of heads and maps; --prune removes {'it' if one else 'them'})"))

    @property
    def found_nothing(self) -> bool:
        """The walk found no image file at all: a wrong folder, most likely."""
        return not (self.n_embedded or self.n_cached or self.n_failed or self.n_failed_before or self.n_deleted
                    or self.n_moved or self.n_duplicates)


def default_workers(*, gpu_decode: bool = False) -> int:
    """Decode workers when the caller names none: all cores but one (at most 16).

    CPU decode: threads. The thread that takes the decoded batches (the engine's) decodes one itself
    whenever it would otherwise wait (``_ahead``), so when decoding is the bottleneck (camera photos)
    every core decodes, and when the model is (small JPEGs) one thread fewer competes with
    onnxruntime's. ``python benchmarks/decode_threads.py`` (2-core Xeon) gives the figures.
    GPU decode: processes beside nvJPEG, half of those, the other half left to what feeds the GPU
    (file reads, nvJPEG's host side, the engine threads, the store writes; not yet measured against
    other splits)."""
    cpu_decoders = max(1, min(16, (os.cpu_count() or 2) - 1))
    return cpu_decoders // 2 if gpu_decode else cpu_decoders


def embed_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    batch_size: int | Literal["auto"] | None = None,
    workers: int | None = None,
    device: Device = "auto",
    engine: EngineName = "auto",
    half: bool = False,
    prune: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    models_dir: str | os.PathLike | None = None,
    progress: bool = False,
    decode: Literal["auto", "cpu", "gpu"] = "auto",
    compile: bool | str = False,
    address: str | None = None,
    num_gpus_per_worker: float = 0.0,
    devices: Sequence[str] | None = None,
    new_folder: bool = False,
    retry_failed: bool = False,
    repair: bool = False,
) -> RunStats:
    """Embed every image under ``root`` into the HDF5 cache ``out``; only new or changed files are decoded.

    Args:
        model: a backbone name (exported to ``models_dir`` on first use) or an exported .onnx file.
        workers: decode threads running ahead of the model (default: cores - 1); 0 decodes in the
            engine's thread. With GPU decode, processes that decode a share of the batches beside
            nvJPEG (default: half the cores); 0 leaves every batch to the GPU.
        half: fp16 model and float16 storage (a separate group, ``NAME-fp16``).
        prune: remove rows of files no longer under ``root``.
        new_folder: ``out`` was made from another folder that is still there, and ``root`` now stands
            for it (a copy); otherwise such a cache is refused (StoreError): keys are paths relative to
            the folder, so two folders' files at the same path would take each other's rows.
        retry_failed: try again the files that failed before though unchanged (skipped otherwise): a
            higher ``max_pixels``, a decoder installed or permissions fixed since.
        repair: first drop the rows the cache cannot vouch for (a chunk failing its checksum: bytes
            changed on disk; embeddings that are not finite numbers), so that this run embeds their
            files again (:meth:`EmbeddingStore.drop_damaged_rows`); reads every stored number once.
        progress: show a tqdm bar (images, images/s, ETA).
        decode: "gpu" decodes JPEGs with nvJPEG and resizes on the GPU (the torch engine on CUDA);
            "auto" does so whenever that engine runs.
        compile: torch engine only: torch.compile it (True or a mode name).
        batch_size: images per engine call (default: 8 on the CPU, 32 on a GPU: ``default_batch_size``),
            or "auto": from free memory (featx.runtime.auto_batch_size). Out of memory, it halves and
            the same images are retried.
        devices: one engine per entry ("cpu", "cuda:0", "cuda:1", ...), sharing the folder and the store;
            default: every visible GPU, else the CPU.
        engine: "auto" measures the engines once per model and device (featx.calibration) and takes the
            fastest; "ray" runs on a Ray cluster (``address``, ``num_gpus_per_worker``; see featx.rayengine)
            and gives the same cache; ray is imported only then.

    Returns:
        RunStats; bad images are counted and stored as failures, never raised.
    """
    root = folder_to_walk(root)
    check_store_path(out)
    if engine == "ray":
        from .rayengine import embed_folder_ray

        # said rather than silently ignored: the cache would not be what was asked for
        asked = {"half": half, "compile": compile, "devices": devices, "decode gpu": decode == "gpu",
                 "batch size auto": batch_size == "auto",
                 f"device {device}": device not in ("auto", "cpu")}
        unsupported = [name for name, given in asked.items() if given]
        if unsupported:
            raise FeatxError(f"the ray engine does not take {', '.join(unsupported)} (its actors run the fp32 ONNX "
                             "model on the CPU, or CUDA with --num-gpus-per-worker); drop them or embed without "
                             "--engine ray")
        return embed_folder_ray(root, out, model=model, weights=weights, batch_size=batch_size, workers=workers,
                                address=address, num_gpus_per_worker=num_gpus_per_worker, max_pixels=max_pixels,
                                models_dir=models_dir, prune=prune, new_folder=new_folder, retry_failed=retry_failed,
                                repair=repair)
    ray_only = [name for name, given in (("--address", address), ("--num-gpus-per-worker", num_gpus_per_worker))
                if given]
    if ray_only:  # said rather than left unused: no cluster is asked for without --engine ray
        raise FeatxError(f"{' and '.join(ray_only)} {'is' if len(ray_only) == 1 else 'are'} the ray engine's: add "
                         "--engine ray, or drop it")
    start = time.perf_counter()
    model_file = ensure_model_file(model, weights=weights, half=half, models_dir=models_dir)
    workers_given, workers = workers, default_workers() if workers is None else workers
    devices = list(devices) if devices else default_devices(device)
    n_cpu = sum(not is_cuda(d) for d in devices)
    # decode workers share the CPU with onnxruntime: its spinning threads would take their cores;
    # several engines on the CPU split its cores between them
    threads = max(1, (os.cpu_count() or 2) // n_cpu) if n_cpu > 1 else None
    auto_batch = batch_size == "auto"
    batch_size = batch_size or default_batch_size(devices[0])
    first_batch = (256 if is_cuda(devices[0]) else batch_size) if auto_batch else int(batch_size)
    runners = [load_model(model_file, device=d, engine=engine, compile=compile, spin=workers == 0, threads=threads,
                          batch_size=first_batch) for d in devices]
    if auto_batch:
        batch_size = min(auto_batch_size(r) for r in runners)
        _logger.info("batch size %d, from free memory", batch_size)
    encoders = [BackoffEncoder(r, batch_size) for r in runners]
    for e in encoders:
        e.warmup()
    info = runners[0].info
    on_gpu_torch = all(r.name == "torch" and is_cuda(r.device) for r in runners)
    gpu_decode = decode == "gpu" or (decode == "auto" and on_gpu_torch)
    if gpu_decode and not on_gpu_torch:
        raise FeatxError("--decode gpu needs the torch engine on CUDA (--engine torch --device cuda)")
    if gpu_decode and workers_given is None:
        workers = default_workers(gpu_decode=True)
    group = Path(model_file).stem
    stats = RunStats(out=str(out), model=group, engine=", ".join(
        f"{r.name}{' compiled' if getattr(r, 'compiled', False) else ''} ({r.device})" for r in runners),
                     batch_size=batch_size)

    with EmbeddingStore(out, group, info=info, half=half, folder=root, new_folder=new_folder,
                        model_file=model_file) as store:
        stats.folder, stats.subfolder = store.folder, store.subfolder
        if repair:
            stats.repaired = store.drop_damaged_rows()
        label_of = store.label_index(classes_walked(store.folder, store.subfolder))
        done, failed_before = store.done(), store.failed()
        seen: set[str] = set()
        bar = _FolderProgress(root, progress)
        store_lock = threading.Lock()  # the walk's thread and the writer below both write the store
        pending = PendingFiles(store.folder, store, stats, seen, done, failed_before, on_skip=lambda: bar.update(1),
                               label_of=label_of, store_lock=store_lock, subfolder=store.subfolder,
                               retry_failed=retry_failed)

        recovered: set[str] = set()
        batches = _walk_ahead(_chunks(pending, batch_size))
        cpu_pool = None
        if gpu_decode:  # each GPU decodes the batches its engine takes; one pool of CPU decoders helps them all
            from .gpudecode import jpeg_library

            source = batches
            stats.jpeg_library = jpeg_library()
            if workers > 0:
                cpu_pool = decode_pool(workers)
            stages = [functools.partial(_gpu_decode_ahead, cfg=info.preprocess, device=e.engine.device,
                                        max_pixels=max_pixels, cpu_pool=cpu_pool, cpu_workers=workers)
                      for e in encoders]
        else:  # one pool of decode threads feeds every engine
            source = _ahead(batches, lambda batch: load_batch([e.path for e in batch], info.preprocess, max_pixels),
                            workers)
            stages = [_decoded_upstream] * len(encoders)
        stats.load_seconds = time.perf_counter() - start
        try:
            with _EngineThreads(source, stages, encoders) as results:
                try:
                    for batch, decoded, emb in results:
                        ok = [batch[i] for i in decoded.ok]
                        with store_lock:
                            if ok:
                                labels = [label_of[e.label] if e.label is not None else -1 for e in ok]
                                new = [i for i, e in enumerate(ok) if e.key not in done]
                                changed = [i for i, e in enumerate(ok) if e.key in done]
                                digests, phashes = decoded.digests, decoded.phashes
                                store.append([ok[i].key for i in new], emb[new], [labels[i] for i in new],
                                             [ok[i].size for i in new], [ok[i].mtime_ns for i in new],
                                             digests=[digests[i] for i in new], phashes=phashes[new])
                                if changed:
                                    store.replace([done[ok[i].key][0] for i in changed], emb[changed],
                                                  [labels[i] for i in changed], [ok[i].size for i in changed],
                                                  [ok[i].mtime_ns for i in changed],
                                                  digests=[digests[i] for i in changed], phashes=phashes[changed])
                                recovered.update(e.key for e in ok if e.key in failed_before)
                                stats.n_embedded += len(ok)
                            if decoded.failed:
                                bad = [(batch[i], reason) for i, reason in decoded.failed]
                                store.add_failures([e.key for e, _ in bad], [r for _, r in bad],
                                                   [e.size for e, _ in bad], [e.mtime_ns for e, _ in bad])
                                for e, r in bad:
                                    _say_failure(e.key, r, len(stats.failures), out)
                                    stats.failures.append((e.key, r))
                                stats.n_failed += len(bad)
                        stats.decoded_by[decoded.decoded_by] = stats.decoded_by.get(decoded.decoded_by, 0) + len(batch)
                        bar.update(len(batch), failed=stats.n_failed)
                finally:
                    bar.close()
                    if cpu_pool is not None:
                        cpu_pool.shutdown(wait=False, cancel_futures=True)
                    stats.seconds = time.perf_counter() - start
        finally:
            batches.close()  # its thread stops once the engine threads have
        pending.store_copies()
        hash_unhashed_rows(store, seen, info.preprocess, stats, workers=workers if not gpu_decode else None,
                           progress=progress)
        stats.backoffs = [limit for e in encoders for limit in e.backoffs]
        finish_walk(store, pending, root, out, prune=prune, recovered=recovered | pending.recovered)
    stats.seconds = time.perf_counter() - start
    return stats


def finish_walk(store, pending: PendingFiles, root, out, *, prune: bool, recovered: set[str]) -> None:
    """After a run's walk and its embeddings are stored: drop the failure records of ``recovered`` files
    (they have rows now), find the stored files deleted since and those unreadable now, prune their rows
    or record them as gone (train-head, map, evaluate, predict and similar leave them out)."""
    stats = pending.stats
    deleted = pending.gone()
    stats.deleted = sorted(deleted & set(pending.done))
    stats.unreadable_now = sorted(pending.unreadable_now(), key=os.fsencode)
    check_prune(root, out, prune, pending.seen, stats.deleted, store.subfolder)
    if recovered or (prune and deleted):
        store.rewrite_without(recovered | (deleted if prune else set()), failures=True)
    if prune and (deleted or stats.unreadable_now):  # an unreadable file's failure record stays
        stats.n_pruned = store.rewrite_without(deleted | set(stats.unreadable_now))
    store.record_gone([] if prune else stats.gone)


def classes_walked(folder: str | os.PathLike, subfolder: str = "") -> list[str]:
    """The classes a walk of ``folder`` (or of its ``subfolder`` alone) can give its files."""
    return [subfolder.split("/")[0]] if subfolder else class_names_of(folder)


def check_prune(root, out, prune: bool, seen: set[str], deleted: list[str], subfolder: str = "") -> None:
    """--prune on a folder with no file left drops every row: far more often a drive not mounted (its
    mount point is an empty folder) or a sync not started than a collection deleted. Refused."""
    if prune and deleted and not seen:
        raise FeatxError(f"{root} has no images now, and --prune would remove all {len(deleted):,} of its rows from "
                         f"{out}: a drive not mounted, or a sync not finished? Nothing was removed"
                         + ("" if subfolder else f" (delete {out} to start over)"))


def default_devices(device: Device) -> list[str]:
    """"auto"/"cuda": every visible GPU (one engine each; CUDA_VISIBLE_DEVICES narrows it), else the CPU."""
    device_kind = resolve_device(device)
    if device_kind == "cuda":
        return [f"cuda:{i}" for i in range(cuda_device_count())]
    return [device_kind]


class _EngineThreads:
    """One thread per engine pulls batches from a shared source, decodes them where its stage says
    (GPU decode on its own device, or nothing when the source is already decoded), encodes them and
    hands them back; iteration yields (batch, DecodedBatch, embeddings) in the source's order.

    The engines run while the caller writes the previous batches to the store, so GPU work, host
    copies and HDF5 writes overlap. The source runs in whichever engine thread pulls next, one at a
    time; it does not touch the store (the walk feeding it writes under the caller's store lock).
    """

    def __init__(self, source, stages, encoders: list[BackoffEncoder], depth: int = 2):
        self._source_lock = threading.Lock()
        self._source = source
        self._numbered = self._number(source)
        self._results: queue.Queue = queue.Queue(maxsize=depth * len(encoders))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(stage, encoder), daemon=True,
                                          name=f"featx-engine-{encoder.engine.device}")
                         for stage, encoder in zip(stages, encoders)]

    def _number(self, source):
        for seq, item in enumerate(source):
            if isinstance(item, tuple):  # (batch, decoded) from the decode pool
                batch, decoded = item
                yield _Batch(batch, seq=seq, decoded=decoded)
            else:
                yield _Batch(item, seq=seq)

    def _pull(self):
        """The shared source, one batch at a time, until stopped."""
        while not self._stop.is_set():
            with self._source_lock:
                item = next(self._numbered, None)
            if item is None:
                return
            yield item

    def _work(self, stage, encoder: BackoffEncoder) -> None:
        """``stage`` maps this thread's batches to (batch, DecodedBatch) pairs."""
        if is_cuda(encoder.engine.device):
            import torch

            torch.cuda.set_device(encoder.engine.device)  # this thread's current stream is on its own GPU
        staged = stage(self._pull())
        try:
            for batch, decoded in staged:
                emb = encoder.encode(decoded.images).embedding if decoded.ok else None
                if emb is not None:
                    emb, decoded = _without_non_finite(emb, decoded)
                # the pixels are not needed any more: a batch waiting for its turn holds only its embeddings
                decoded = dataclasses.replace(decoded, images=None)
                batch.decoded = None
                self._results.put((batch.seq, batch, decoded, emb))
        except BaseException as e:  # handed to the caller, which raises it
            self._results.put((-1, e, None, None))
        finally:
            staged.close()
            self._results.put(None)  # this thread is done

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __iter__(self):
        waiting: dict[int, tuple] = {}
        next_seq, running = 0, len(self._threads)
        while running:
            got = self._results.get()
            if got is None:
                running -= 1
                continue
            seq, batch, decoded, emb = got
            if seq < 0:
                raise batch
            waiting[seq] = (batch, decoded, emb)
            while next_seq in waiting:
                yield waiting.pop(next_seq)
                next_seq += 1

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:  # each finishes the batch in hand; results are no longer read
            while t.is_alive():
                try:
                    self._results.get(timeout=0.1)
                except queue.Empty:
                    pass
        with self._source_lock:
            self._numbered.close()
            if hasattr(self._source, "close"):
                self._source.close()
        return False


def _decoded_upstream(batches):
    """The stage for batches the decode pool already decoded."""
    for batch in batches:
        yield batch, batch.decoded


class _Batch(list):
    """A batch of FileEntry that remembers its place in the walk (and its decoded images, when decoded upstream)."""

    def __init__(self, entries, seq: int, decoded=None):
        super().__init__(entries)
        self.seq = seq
        self.decoded = decoded


class PendingFiles:
    """Files under ``root`` that need embedding: new, or changed since their row or failure was stored.

    Iterating walks the folder once. It counts cached and earlier-failed files in ``stats``, records new
    walk failures (unreadable folders, symlink loops) in the store, and adds every key seen to ``seen``
    (for deletions). A file whose bytes (SHA-256) are already embedded is not decoded again:

    - a new path whose bytes a stored row embedded (renamed, moved into another class folder, copied,
      whatever its mtime) gets that row's embedding under its new key and label, written as the walk goes;
    - a stored path whose mtime changed but whose bytes did not (a copied or synced folder) only has its
      mtime updated, and counts as cached;
    - a new path with the bytes of a file this run embeds (the same photo in two albums, a folder copied
      inside the root) is embedded once: ``store_copies()``, called once the run's embeddings are
      stored, gives it that file's row. Killed before that, the next run finds the row by its digest.

    They count in ``stats.n_moved`` and ``stats.n_duplicates``. Only a file whose size equals that of a
    file with a known digest (a stored row's, or another file's of this run) is hashed before it is
    decoded, so an ordinary new file is read once. Hashing happens here, in the walk: a thread pool
    measured slower on 60 kB JPEGs (its per-file overhead exceeds the hash). Shared by the single-machine
    and the Ray paths, so both skip exactly the same files.
    """

    def __init__(self, root, store, stats: RunStats, seen: set[str], done: dict, failed_before: dict, *,
                 label_of: dict[str, int], on_skip=lambda: None, store_lock: threading.Lock | None = None,
                 subfolder: str = "", retry_failed: bool = False):
        self.root, self.store, self.stats, self.seen = Path(root), store, stats, seen
        self.retry_failed = retry_failed  # files that failed before are tried again, unchanged or not
        self.subfolder = subfolder  # the part of root walked ('/'-separated), "" for all of it
        self.done, self.failed_before, self.label_of, self.on_skip = done, failed_before, label_of, on_skip
        # held for every store access: the walk may run in a thread of its own beside the store's writer
        self.store_lock = store_lock or threading.Lock()
        self._stored = _StoredContent(self.root, store, done, self.store_lock)
        # by size, the files handed on to be embedded: the key of the first one while it is the only one
        # and was not hashed; None once every one handed on of that size has its digest in _handed_on
        self._unhashed_of_size: dict[int, str | None] = {}
        self._handed_on: dict[str, str] = {}  # digest -> key of the file handed on with those bytes
        self._reused: list[tuple[FileEntry, int, str]] = []  # (new path, row whose embedding it takes, digest)
        self._touched: list[tuple[int, int]] = []  # (stored row, new mtime_ns)
        self._copies: list[tuple[FileEntry, str, str]] = []  # (new path, key handed on with its bytes, digest)
        self.recovered: set[str] = set()  # keys with a failure on record that took a row (their old failure is stale)
        self._failing: set[str] = set()  # keys whose file the walk found failing as it failed before

    def __iter__(self) -> Iterator[FileEntry]:
        for item in walk_images(self.root, self.subfolder):
            if self._needs_embedding(item):
                yield item
        with self.store_lock:
            _store_touched(self.store, self._touched)
            _store_reused(self.store, self._reused, self.label_of)

    def _needs_embedding(self, item) -> bool:
        stats = self.stats
        self.seen.add(item.key)
        if isinstance(item, WalkFailure):
            if item.key in self.failed_before and not self.retry_failed:
                stats.n_failed_before += 1
                self._failing.add(item.key)
                return False
            with self.store_lock:  # the store's writer counts decode failures under it
                stats.failures.append((item.key, item.reason))
                stats.n_failed += 1
                self.store.add_failures([item.key], [item.reason], [0], [0])
            return False
        row = self.done.get(item.key)
        if row is not None and row[1:] == (item.size, item.mtime_ns):
            stats.n_cached += 1
            self.on_skip()
            return False
        before = self.failed_before.get(item.key)
        if before is not None and before[1:] == (item.size, item.mtime_ns) and not self.retry_failed:
            stats.n_failed_before += 1
            self._failing.add(item.key)
            self.on_skip()
            return False
        digest = None
        if row is not None:  # same path, new mtime: unchanged when its size and bytes are
            if row[1] == item.size and self._stored.digest(row[0]):
                digest = _file_digest_or_none(item.path)
                if digest is not None and digest == self._stored.digest(row[0]):
                    self._touched.append((row[0], item.mtime_ns))
                    stats.n_cached += 1
                    self.on_skip()
                    if len(self._touched) >= 256:
                        with self.store_lock:
                            _store_touched(self.store, self._touched)
                    return False
        else:
            if self._stored.has_size(item.size):
                digest = _file_digest_or_none(item.path)
            stored_row = self._stored.row_of(digest) if digest is not None else self._stored.legacy_row_of(item)
            if stored_row is not None:
                self._reused.append((item, stored_row, digest or ""))
                if item.key in self.failed_before:
                    self.recovered.add(item.key)
                stats.n_moved += 1
                self.on_skip()
                if len(self._reused) >= 256:
                    with self.store_lock:
                        _store_reused(self.store, self._reused, self.label_of)
                return False
        if item.size in self._unhashed_of_size:  # another file of this size is on its way: compare bytes
            first = self._unhashed_of_size[item.size]
            if first is not None:
                first_digest = _file_digest_or_none(os.path.join(self.root, first))
                if first_digest is not None:
                    self._handed_on.setdefault(first_digest, first)
                self._unhashed_of_size[item.size] = None
            digest = digest or _file_digest_or_none(item.path)
            original = self._handed_on.get(digest) if digest is not None else None
            if original is not None and row is None:
                self._copies.append((item, original, digest))
                stats.n_duplicates += 1
                self.on_skip()
                return False
        if digest is not None:
            self._handed_on.setdefault(digest, item.key)
            self._unhashed_of_size.setdefault(item.size, None)
        else:
            self._unhashed_of_size.setdefault(item.size, item.key)
        return True

    def gone(self) -> set[str]:
        """Stored keys (rows and failures) that the walk, once done, did not meet: their files are gone. A
        walk of a subfolder answers for the keys under it alone."""
        gone = (set(self.done) | set(self.failed_before)) - self.seen
        if self.subfolder:
            gone = {k for k in gone if k.startswith(self.subfolder + "/") or k == self.subfolder}
        return gone

    def unreadable_now(self) -> set[str]:
        """Stored keys with a row from before this run whose file fails now (this run, or unchanged since it
        failed before): changed into a file that cannot be read after it was embedded. A fresh embed of the
        folder would hold their failure alone. Asked once the run's failures are all in ``stats``."""
        return (self._failing | {key for key, _ in self.stats.failures}) & set(self.done)

    def store_copies(self) -> None:
        """Give each file that had the bytes of another file of this run that file's row, or its failure.

        Called once the run's embeddings are stored. A copy whose original did not reach the store
        with those bytes (changed in the meantime) is left out; the next run embeds it.
        """
        if not self._copies:
            return
        rows, digests, stats = self.store.done(), self.store.digests(), self.stats
        failed_now = dict(stats.failures)
        bad = []
        for item, original, digest in self._copies:
            row = rows.get(original)
            if row is not None and digests[row[0]] == digest.encode("ascii"):
                self._reused.append((item, row[0], digest))
                if item.key in self.failed_before:
                    self.recovered.add(item.key)
            elif original in failed_now:  # the same bytes fail the same way
                bad.append((item, failed_now[original]))
                stats.n_duplicates -= 1
            else:
                stats.n_duplicates -= 1
        _store_reused(self.store, self._reused, self.label_of)
        if bad:
            self.store.add_failures([e.key for e, _ in bad], [r for _, r in bad], [e.size for e, _ in bad],
                                    [e.mtime_ns for e, _ in bad])
            stats.failures += [(e.key, r) for e, r in bad]
            stats.n_failed += len(bad)
        self._copies.clear()


class _StoredContent:
    """The cache's rows looked up by the content of the files they embedded, for ``PendingFiles``.

    A new path is hashed only when a stored row with a digest has its size; same SHA-256, same bytes,
    same embedding, so a renamed copy whose original is still there is reused too, and a different
    file that happens to share size and mtime (extracted from a zip with 2-second times, say) is not.
    Rows stored before featx kept digests fall back to the file name: same name, size and mtime, and
    the stored file gone. The tables are built on first need: a run that meets only cached files
    reads no digest.
    """

    def __init__(self, root: Path, store, done: dict, store_lock: threading.Lock):
        self.root, self.store, self.done, self.store_lock = root, store, done, store_lock
        self._digests: np.ndarray | None = None  # S64 by row; b"" for rows stored before digests were kept
        self._by_digest: tuple[np.ndarray, np.ndarray] | None = None  # (sorted digests, their rows)
        self._sizes: np.ndarray | None = None  # sorted distinct sizes of rows with a digest
        self._by_identity: dict[tuple[int, int], list[str]] | None = None  # rows without one

    def digest(self, row: int) -> str:
        if self._digests is None:
            # the rows of ``done``, not those this run appends meanwhile
            with self.store_lock:
                digests = self.store.digests()
            self._digests = digests[:max((r for r, _, _ in self.done.values()), default=-1) + 1]
        return self._digests[row].decode("ascii")

    def _index(self) -> None:
        if self.done:
            self.digest(0)
        digests = self._digests if self._digests is not None else np.zeros(0, "S64")
        known = np.flatnonzero(digests != b"")
        order = np.argsort(digests[known], kind="stable")
        self._by_digest = digests[known][order], known[order]
        sizes = np.zeros(len(digests), np.int64)
        self._by_identity = {}
        for key, (row, size, mtime) in self.done.items():
            sizes[row] = size
            if not digests[row]:
                self._by_identity.setdefault((size, mtime), []).append(key)
        self._sizes = np.unique(sizes[known])

    def has_size(self, size: int) -> bool:
        """Whether a stored row with a digest has this size (then a new file of it is worth hashing)."""
        if self._sizes is None:
            self._index()
        i = np.searchsorted(self._sizes, size)
        return bool(i < len(self._sizes) and self._sizes[i] == size)

    def row_of(self, digest: str) -> int | None:
        """A stored row that embedded these bytes, or None."""
        if self._by_digest is None:
            self._index()
        digests, rows = self._by_digest
        i = np.searchsorted(digests, digest.encode("ascii"))
        return int(rows[i]) if i < len(digests) and digests[i] == digest.encode("ascii") else None

    def legacy_row_of(self, item: FileEntry) -> int | None:
        """A row without a digest for a moved file: same name, size and mtime, its stored path gone."""
        if self._by_identity is None:
            self._index()
        for key in self._by_identity.get((item.size, item.mtime_ns), ()):
            if key.rsplit("/", 1)[-1] == item.key.rsplit("/", 1)[-1] and not os.path.lexists(self.root / key):
                return self.done[key][0]
        return None


def _file_digest_or_none(path: str) -> str | None:
    """The file's content digest; None when it cannot be read (its decode then records why)."""
    try:
        return file_digest(path)
    except OSError:
        return None


def _store_touched(store, touched: list) -> None:
    """Record the new mtimes of stored files whose bytes did not change, so the next run skips them unread."""
    if touched:
        store.touch([row for row, _ in touched], [mtime for _, mtime in touched])
        touched.clear()


def _store_reused(store, reused: list, label_of) -> None:
    """Append rows for new paths whose bytes were embedded before: the stored embeddings under the new
    keys and labels, with the new files' identities. ``reused``: (FileEntry, row, digest)."""
    if not reused:
        return
    rows, back = np.unique([row for _, row, _ in reused], return_inverse=True)  # h5py reads rows in increasing order
    embeddings = store.group["embeddings"][rows][back]
    entries = [e for e, _, _ in reused]
    store.append([e.key for e in entries], embeddings,
                 [label_of[e.label] if e.label is not None else -1 for e in entries],
                 [e.size for e in entries], [e.mtime_ns for e in entries],
                 digests=[digest for _, _, digest in reused], phashes=store.phashes(rows)[back])
    reused.clear()


def _count_candidates(root: Path, stop: threading.Event | None = None) -> int | None:
    """Image files under root by extension (no file stat), and files without one whose first bytes are an
    image's, as the walk takes them: the progress bar's total.
    The walk's folders: hidden and system ones left out (a NAS's @eaDir holds three thumbnails a photo),
    symlinked ones followed once. None when ``stop`` is set before the count is done."""
    n, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if stop is not None and stop.is_set():
            return None
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames.clear()
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not is_passed_over(d)]
        for name in filenames:
            ext = os.path.splitext(name)[1].lower()
            if not is_passed_over(name) and (ext in IMAGE_EXTENSIONS or
                                             (not ext and content_is_image(os.path.join(dirpath, name)))):
                n += 1
    return n


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


class _FolderProgress:
    """embed_folder's bar, moved by the walk's thread (files cached or skipped) and by the writer. Its
    total is counted in a thread of its own: listing a large tree on a network share takes minutes, and
    the run no longer waits for it to start. A run done before the count takes what it did as its total."""

    def __init__(self, root: Path, show: bool):
        self.bar = _progress_bar(None, show)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if not isinstance(self.bar, _NoBar):  # shown (not -q, nor TQDM_DISABLE)
            threading.Thread(target=self._count, args=(root,), name="featx-count", daemon=True).start()

    def _count(self, root: Path) -> None:
        total = _count_candidates(root, self.stop)
        with self.lock:
            if total is not None and not self.stop.is_set():
                self.bar.total = total
                self.bar.refresh()

    def update(self, n: int, *, failed: int | None = None) -> None:
        with self.lock:
            self.bar.update(n)
            if failed is not None:
                self.bar.set_postfix(failed=failed, refresh=False)

    def close(self) -> None:
        with self.lock:
            self.stop.set()
            if getattr(self.bar, "total", 0) is None:
                self.bar.total = self.bar.n
            self.bar.close()


LOGGED_BAR_SECONDS = 30  # a bar written to a file (nohup, a scheduler's log) gets a line this seldom
_LOGGED_METER = "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LoggedBar:
    """A progress bar for stderr that is not a terminal (nohup, a batch scheduler, CI). tqdm redraws its
    line in place with '\r', and a log keeps every redraw on one line: ``tail`` of a ten-hour run showed
    a line of all of them, and a run's log began with a "0img" line drawn before the walk found a file.
    Here tqdm's meter (without the bar) is a line of its own every LOGGED_BAR_SECONDS, and once more
    when the bar is done, unless it is a passing one (``leave=False``: a fine-tuning epoch's)."""

    def __init__(self, total: int | None, desc: str | None, unit: str, leave: bool):
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = 0
        self.postfix: str | None = None
        self.started = self.logged = time.monotonic()
        self.lock = threading.Lock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.n += n
            if time.monotonic() - self.logged >= LOGGED_BAR_SECONDS:
                self._write()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self) -> None:
        """A log gets a line as work is done, not when the total is counted."""

    def close(self) -> None:
        with self.lock:
            if not self.closed and self.leave and (self.n or self.total):
                self._write()
            self.closed = True

    def _write(self) -> None:
        import sys

        from tqdm import tqdm

        self.logged = time.monotonic()
        elapsed = self.logged - self.started
        line = tqdm.format_meter(self.n, self.total, elapsed, prefix=f"{self.desc}: " if self.desc else "",
                                 unit=self.unit, unit_scale=self.unit != "img", postfix=self.postfix,
                                 rate=self.n / elapsed if elapsed > 0 else None,
                                 bar_format=None if self.total is None else _LOGGED_METER)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _redraws_in_place(stream) -> bool:
    """Whether ``stream`` shows a line redrawn behind '\r' in place: a terminal, or a Jupyter notebook's
    output (ipykernel's stream, no terminal, whose front end draws '\r' as a terminal does)."""
    return stream.isatty() or type(stream).__module__.startswith("ipykernel.")


def _progress_bar(total: int | None, show: bool, desc: str | None = None, *, leave: bool = True, unit: str = "img"):
    import sys

    if not show or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return _NoBar()
    if not _redraws_in_place(sys.stderr):
        return _LoggedBar(total, desc, unit, leave)
    from tqdm import tqdm

    # TQDM_DISABLE is read above, when the bar is made: tqdm reads it once, when first imported
    return tqdm(total=total, unit=unit, unit_scale=unit != "img", dynamic_ncols=True, smoothing=0.1, desc=desc,
                leave=leave, disable=False)


def _walk_ahead(batches: Iterator[list[FileEntry]], depth: int = 8) -> Iterator[list[FileEntry]]:
    """``batches`` produced in a thread of their own, up to ``depth`` ahead: the folder walk (stat, and
    the hashing that finds files embedded already) then overlaps decoding and the engines instead of
    running between their steps. An error in the walk (a store write refused) is raised here."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def walk() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=walk, daemon=True, name="featx-walk")
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _chunks(items: Iterator[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    chunk: list[FileEntry] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _gpu_decode_ahead(batches: Iterator[list[FileEntry]], cfg, device: str, max_pixels: int, depth: int = 3,
                      cpu_pool: cf.Executor | None = None, cpu_workers: int = 0):
    """Yield (batch, DecodedBatch with the images on ``device``) as the decodes finish; the engine
    threads put the results back in walk order.

    nvJPEG decodes up to ``depth`` batches ahead in threads, each on its own CUDA stream, so decoding
    the next batches overlaps the model running on the current one (with TorchCodec they decode at
    once, each on a decoder of its own; torchvision's one decoder takes them in turn). The CPU cores
    add their own rate: with ``cpu_pool`` (``cpu_workers`` decode processes), whenever nvJPEG
    has ``depth`` batches queued and the pool has room, the next batch is decoded there, split into
    one chunk per worker so it finishes about as soon as a GPU batch does, and copied to the device
    from pinned memory in a decode thread, so the engine thread never waits on a host copy.
    """
    import torch

    from .gpudecode import GpuDecoder

    decoder = GpuDecoder(cfg, device=device, max_pixels=max_pixels, threads=min(32, (os.cpu_count() or 2) * 2))
    pool = cf.ThreadPoolExecutor(depth + 3)  # up to depth + 1 nvJPEG batches, 2 CPU batches waiting for upload
    on_gpu: deque = deque()
    on_cpu: deque = deque()

    def from_cpu(chunks) -> DecodedBatch:
        merged = _merge_chunks([f.result() for f in chunks])
        return dataclasses.replace(merged, images=decoder.to_device(merged.images))

    def take(queue: deque):
        b, fut = queue.popleft()
        decoded = fut.result()
        if is_cuda(device):
            decoded.images.record_stream(torch.cuda.current_stream())  # freed only after the model has read it
        return b, decoded

    try:
        for batch in batches:
            paths = [e.path for e in batch]
            if cpu_pool is not None and len(on_gpu) >= depth and len(on_cpu) < 2:
                step = -(-len(paths) // max(1, cpu_workers))
                chunks = [cpu_pool.submit(load_batch, paths[i:i + step], cfg, max_pixels)
                          for i in range(0, len(paths), step)]
                on_cpu.append((batch, pool.submit(from_cpu, chunks)))
            else:
                on_gpu.append((batch, pool.submit(decoder.decode, paths, decoder.read(paths))))
            while on_cpu and on_cpu[0][1].done():
                yield take(on_cpu)
            while len(on_gpu) > depth or (on_gpu and on_gpu[0][1].done()):
                yield take(on_gpu)
        while on_gpu or on_cpu:
            yield take(on_gpu if on_gpu and (not on_cpu or on_gpu[0][1].done()) else on_cpu)
    except cf.process.BrokenProcessPool:  # a traceback of the pool's insides says less than this
        raise FeatxError("a decode worker process died (killed by the system: out of memory?); the batches "
                         "committed so far are kept: run the same command again to resume") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        decoder.close()


def _merge_chunks(parts: list) -> DecodedBatch:
    """One DecodedBatch from consecutive chunks of a batch, positions counted from the batch's start."""
    ok, failed, digests, offset = [], [], [], 0
    for part in parts:
        ok += [offset + i for i in part.ok]
        failed += [(offset + i, reason) for i, reason in part.failed]
        digests += part.digests
        offset += len(part.ok) + len(part.failed)
    return DecodedBatch(np.concatenate([p.images for p in parts]), ok, failed, digests=digests,
                        phashes=np.concatenate([p.phashes for p in parts]))


def decode_pool(workers: int) -> cf.ProcessPoolExecutor:
    """Decode processes. Spawned, not forked: the parent holds onnxruntime/torch threads that a fork
    would copy mid-flight. See ``_decode_worker_start`` for how they stop."""
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_decode_worker_start, initargs=(_warning_filters(),))


def _warning_filters() -> list[tuple]:
    """This process's warning filters as ``warnings.filterwarnings`` arguments, first filter first: a
    spawned process starts with Python's defaults, and would print the warnings its parent had silenced
    (the CLI's, of Pillow's on damaged files). Less those of a warning class defined in ``__main__`` (a
    notebook's), which a spawned process cannot import to unpickle."""
    def pattern(regex) -> str:  # compiled by filterwarnings, a plain string where -W or the C module set it
        return getattr(regex, "pattern", regex) or ""

    return [(action, pattern(message), category, pattern(module), lineno)
            for action, message, category, module, lineno in warnings.filters if category.__module__ != "__main__"]


def _decode_worker_start(warning_filters: Sequence[tuple] = ()) -> None:
    """A decode worker ignores SIGINT and SIGTERM: Ctrl-C in a terminal and a scheduler's SIGTERM reach
    the whole process group, the parent handles them and stops the pool. Killed by SIGTERM while it sent
    a decoded batch back, a worker left its result half-written in the pipe, and the pool's manager thread
    waited for the rest forever (the parent holds the pipe's write end too, so no EOF comes): `featx embed`
    hung instead of ending (1 SIGTERM in about 15 in the suite's test on Python 3.10; nothing in it is
    version-specific). With SIGINT a worker printed a traceback of its own. It exits when its parent is
    gone: killed (SIGKILL, the OOM killer), the parent cannot stop it, and a worker waiting for its next
    batch never learns (it holds its task queue's write end itself), so orphans lived on with their memory
    (found: workers of the suite's SIGKILL tests, an hour later)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if warning_filters:
        warnings.resetwarnings()
        for action, message, category, module, lineno in reversed(warning_filters):
            warnings.filterwarnings(action, message, category, module, lineno)
    parent = os.getppid()

    def exit_when_orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, daemon=True, name="featx-orphan-watch").start()


def _ahead(items: Iterator, work, workers: int) -> Iterator[tuple]:
    """Yield (item, work(item)) in the order of ``items``, up to 2*workers items worked on ahead in
    threads (0: in the caller's thread). An exception of ``work`` is raised where its item is yielded.
    Where the next result is not ready, the caller works on an item no thread has started rather than
    wait: when decoding is the bottleneck its core decodes too, when the model is it rarely waits.

    Threads, not processes: Pillow lets go of the GIL while it decodes and resizes, so a thread keeps
    up with a process (346 vs 326 images/s of 500x375 JPEGs, 2-core Xeon, ``python
    benchmarks/decode_stages.py --device cpu --n-jpegs 512 --batch-size 64``), and no batch's pixels
    are pickled through a pipe. And nothing of multiprocessing's to go wrong: a worker
    killed mid-way through sending a batch back hung the run, a script calling ``embed_folder``
    without an ``if __name__ == "__main__"`` guard failed in the spawned workers, a SIGKILLed run
    left orphans. The GPU path's CPU share stays in processes (``decode_pool``): at its rates the
    Python part of each decode would compete for the GIL (not measured)."""
    if workers <= 0:
        for item in items:
            yield item, work(item)
        return
    window: deque = deque()
    pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="featx-decode")

    def take() -> tuple:
        item, fut = window.popleft()
        if not fut.done():  # the caller would wait: it works on an item no thread has started instead
            if fut.cancel():  # the one it needs
                return item, work(item)
            for k, (later_item, later) in enumerate(window):
                if later.cancel():
                    window[k] = (later_item, _run_now(work, later_item))
                    break
        return item, fut.result()

    try:
        for item in items:
            window.append((item, pool.submit(work, item)))
            if len(window) >= 2 * workers:
                yield take()
        while window:
            yield take()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_now(work, item) -> cf.Future:
    """work(item) in this thread, as a finished Future: its exception is raised where its result is read."""
    fut: cf.Future = cf.Future()
    try:
        fut.set_result(work(item))
    except Exception as e:
        fut.set_exception(e)
    return fut
