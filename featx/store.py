"""HDF5 embedding cache: one group per model, appended in whole batches, resumable after a kill.

Layout (readable with plain h5py)::

    /<model>/                     attrs: fingerprint, backbone, embed_dim, precision, preprocess (JSON),
                                         featx_version, created, n_rows (rows committed), folder (the
                                         folder embedded) and model_file (the .onnx that embedded it):
                                         absolute paths, bytes as the file system names them
        embeddings     (n, D) float32 or float16, chunked, resizable; every dataset of numbers carries
                              Fletcher-32 checksums (h5py's fletcher32=True), checked by HDF5 on each read
        keys           (n,)   UTF-8 path relative to the folder ('/'-separated)
        labels         (n,)   int32 index into class_names, -1 when unlabelled
        file_size      (n,)   int64  } identity of the file that was embedded: a re-run
        file_mtime_ns  (n,)   int64  } skips a key whose size and mtime are unchanged
        file_sha256    (n,)   64-byte ASCII: SHA-256 hex of the bytes embedded (as sha256sum prints it);
                              renamed, moved and copied files are recognised by it. A cache made before
                              the column existed gets it on its next write, b"" for its old rows
        image_phash    (n,)   uint64 perceptual hash of the model's input (featx.data.perceptual_hashes):
                              resized and re-encoded copies of a photo are found by it. 0 where not
                              known (rows from before the column, as for file_sha256, until the next
                              embed of the folder hashes them; or a black image)
        class_names    (k,)   UTF-8
        failures/      keys, reasons, file_size, file_mtime_ns (same meaning), attr n_rows

Commit protocol: a batch is written to every dataset, the file is flushed, and only then is the
group's ``n_rows`` raised and flushed again. Rows past ``n_rows`` (a batch cut short by a kill) are
dropped when the file is next opened for writing, so key i always matches row i.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FeatxError, StoreError, check_writable_folder, first_line

_logger = logging.getLogger(__name__)

_STR = None  # h5py string dtype, created on first use (h5py imported lazily)
CHUNK_ROWS = 256
# every chunk of numbers carries a Fletcher-32 checksum, checked by HDF5 on each read: bytes changed on disk
# after featx wrote them (a bad sector, a bad copy) are an error, not embeddings that are silently wrong.
# (HDF5 filters no variable-length strings: keys and names are not checksummed.)
_CHECKSUMMED = {"fletcher32": True}


def _str_dtype():
    import h5py

    global _STR
    if _STR is None:
        _STR = h5py.string_dtype("utf-8")
    return _STR


def _encode(keys) -> np.ndarray:
    # non-UTF-8 file names arrive as surrogate-escaped str; their bytes are stored as they are on disk
    return np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=object)


def _decode(raw) -> list[str]:
    return [k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k for k in raw]


def check_store_path(path: str | os.PathLike) -> None:
    """Refuse a cache path that cannot be one before any work starts (the model loads first otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder; the cache is a file, e.g. {path / 'cache.h5'}")
    if not path.exists():
        try:
            check_writable_folder(path.parent, path)
        except FeatxError as e:
            raise StoreError(str(e)) from None
    # a photo or a CSV given as -o by mistake is refused before the model loads (an empty file, as a
    # kill while the cache was first created may leave, is made a cache as HDF5 itself does)
    if path.is_file() and path.stat().st_size and not _is_hdf5(path):
        from .runtime import file_kind

        what = {"onnx": "a model", "safetensors": "a head or a fine-tuning checkpoint"}.get(file_kind(path), "a file")
        raise StoreError(f"{path} is {what}, not an HDF5 cache; give a new file name (or an existing cache)")


def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return h5py.is_hdf5(path)
    except OSError:  # unreadable: opening it says why
        return True


# errno values HDF5 reports when the file system has no locks at all (an NFS mount without its lock
# service: ENOLCK; sshfs and some FUSE and SMB mounts: ENOSYS, EOPNOTSUPP), as against a lock held
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}
_unlocked_warned: set[str] = set()


def _open_h5(path: Path, mode: str, *, locking: bool = True):
    import h5py

    # a reader has no --out to change: it can only wait for the writer (HDF5 without SWMR cannot share)
    locked = (f"{path} is being written by a featx run (file is locked); read it when that run has finished"
              if mode == "r" else
              f"{path} is being written by another featx run (file is locked); wait for it or use another --out")
    if mode == "r" and path.is_dir():  # the photo folder given where its cache goes
        raise StoreError(f"{path} is a folder, not a cache: `featx embed {path} -o cache.h5` makes one of its images")
    try:
        return h5py.File(path, mode, locking=locking)
    except BlockingIOError:
        raise StoreError(locked) from None
    except FileNotFoundError:
        if mode != "r":
            check_store_path(path)
        raise StoreError(f"{path} does not exist") from None
    except PermissionError:
        raise StoreError(f"{path} cannot be opened: permission denied") from None
    except OSError as e:
        text = str(e)
        refused = re.search(r"unable to lock file, errno = (\d+)", text)
        if locking and refused and int(refused.group(1)) in _NO_LOCKS:
            if str(path) not in _unlocked_warned:  # read and written several times a run: said once
                _unlocked_warned.add(str(path))
                _logger.warning("%s: its file system does not lock files (%s); opened without a lock, so nothing "
                                "stops two featx runs writing it at once", path, os.strerror(int(refused.group(1))))
            return _open_h5(path, mode, locking=False)
        if re.search(r"\block(ed|ing)?\b", text, re.IGNORECASE):  # a word: a truncated file's message has "sblock"
            raise StoreError(locked) from None
        cut = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
        if cut:
            raise StoreError(f"{path} is cut short ({int(cut.group(1)):,} of its {int(cut.group(2)):,} bytes: a copy or "
                             "download that did not finish?); copy it again, or embed into a new file") from None
        check_store_path(path)
        raise StoreError(f"{path} cannot be opened as HDF5 ({first_line(e)})") from None


@contextlib.contextmanager
def _read_h5(path: Path):
    """The cache open for reading, an error HDF5 raises while it is read said as damage (:func:`_damage_said`)."""
    with _damage_said(path), _open_h5(path, "r") as f:
        yield f


@contextlib.contextmanager
def _damage_said(path: Path):
    """An error out of HDF5 itself inside the block (a cache whose structure is damaged: a disk error, a
    bad copy; "message not aligned") as one StoreError naming the file, not a traceback."""
    try:
        yield
    except Exception as e:
        if not _raised_by_h5py(e):
            raise
        raise _damaged(path, e) from None


def _damaged(path: Path, error: BaseException) -> StoreError:
    """The one-line error for a cache HDF5 failed to read: what HDF5 said, in words where featx knows them."""
    said = error.args[0] if isinstance(error, KeyError) and error.args else str(error)  # KeyError's str() quotes it
    if _CHECKSUM_FAILED in said:
        return _checksum_failed(path)
    said = f"HDF5 cannot read it ({said.splitlines()[0] if said else type(error).__name__})"
    return StoreError(f"{path} is damaged: {said}; embed into a new file (the images are read again)")


def _checksum_failed(path: Path) -> StoreError:
    return StoreError(f"{path} is damaged: a checksum of its stored data does not match: its bytes changed after "
                      f"featx wrote them; {repair_said(path)}")


def repair_said(cache: str | os.PathLike, folder: str | None = None) -> str:
    """What to do about damaged rows of a cache whose file can still be read."""
    return f"`featx embed {folder or 'FOLDER'} -o {cache} --repair` embeds the damaged rows again, or embed into a new file"


# what HDF5 says when a chunk's Fletcher-32 checksum fails, the only filter featx writes
_CHECKSUM_FAILED = "filter returned failure"


def _raised_by_h5py(error: BaseException) -> bool:
    """Whether ``error`` came out of h5py or HDF5 (its innermost frame is h5py's), not out of featx."""
    if isinstance(error, FeatxError):
        return False
    tb, innermost = error.__traceback__, ""
    while tb is not None:
        innermost, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return re.search(r"(^|[\\/])h5py[\\/]", innermost) is not None


@dataclass
class Embeddings:
    """What :func:`load_embeddings` returns: ``embeddings`` float32 (n, D) with aligned ``keys`` and ``labels``."""

    embeddings: np.ndarray
    keys: list[str]
    labels: np.ndarray  # int32 (n,), -1 for unlabelled
    class_names: list[str]
    model: str
    fingerprint: str
    attrs: dict = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    digests: list[str] = field(default_factory=list)  # SHA-256 hex of each row's file bytes; "" where unknown
    phashes: np.ndarray | None = None  # uint64 (n,) perceptual hash of each row's image; 0 where unknown
    # keys left out (present_only): files the last embed found deleted, or changed into files it cannot read
    gone: list[str] = field(default_factory=list)


def list_models(path: str | os.PathLike) -> list[str]:
    """Model groups in a cache file."""
    with _read_h5(Path(path)) as f:
        return _model_groups(f)


def model_fingerprints(path: str | os.PathLike) -> dict[str, str]:
    """Each model group's fingerprint, from the attributes alone: no row is read."""
    with _read_h5(Path(path)) as f:
        return {model: str(_attrs_of(f[model])["fingerprint"]) for model in _model_groups(f)}


def recorded_paths(path: str | os.PathLike, name: str) -> dict[str, str | None]:
    """Each model group's path attribute ``name``: ``model_file`` (the .onnx that embedded it) or ``folder``
    (the folder it follows); None in caches made before it was recorded."""
    with _read_h5(Path(path)) as f:
        return {model: _attrs_of(f[model]).get(name) for model in _model_groups(f)}


def _model_groups(f) -> list[str]:
    return sorted(k for k in f if "fingerprint" in f[k].attrs)


def _holds_rows(g) -> bool:
    """Whether ``g`` is a group with an ``embeddings`` dataset with rows in it."""
    import h5py

    rows = g.get("embeddings") if isinstance(g, h5py.Group) else None
    return isinstance(rows, h5py.Dataset) and rows.ndim == 2 and rows.shape[0] > 0


def _damaged_groups(f) -> list[str]:
    """Groups holding embeddings without the attributes that say which model made them: a file damaged
    since (its attributes are stored apart from its rows), not a cache of another program."""
    return sorted(k for k in f if "fingerprint" not in f[k].attrs and _holds_rows(f[k]))


def _lost_fingerprint(path, group: str) -> StoreError:
    return StoreError(f"{path} group {group!r} holds embeddings but has lost the fingerprint of the model that made "
                      "them: the file is damaged; embed into a new cache (another --out)")


def _pick_model(f, path: Path, model: str | None) -> str:
    """The group to read: ``model``, or the file's only one."""
    models = _model_groups(f)
    damaged = _damaged_groups(f)
    if damaged and (model in damaged or (model is None and not models)):
        raise _lost_fingerprint(path, model or damaged[0])
    if not models:
        raise StoreError(f"{path} holds no featx embeddings (make them with: featx embed FOLDER -o {path})")
    if model is None:
        if len(models) != 1:
            raise StoreError(f"{path} holds {len(models)} models ({', '.join(models)}); name one with --model")
        model = models[0]
    if model not in models:
        raise StoreError(f"{path} has no embeddings for model {model!r}; it has {', '.join(models)} (--model names one)")
    return model


def _failures_of(g) -> dict[str, str]:
    """key -> reason of a model group's committed failures."""
    if "failures" not in g:
        return {}
    columns, m = _committed_columns(g["failures"])
    return dict(zip(_decode(columns["keys"][:m]), _decode(columns["reasons"][:m])))


def _attrs_of(g) -> dict:
    return {k: (v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v) for k, v in g.attrs.items()}


def load_embeddings(path: str | os.PathLike, model: str | None = None, *, labelled_only: bool = False,
                    present_only: bool = False, rows: np.ndarray | None = None) -> Embeddings:
    """Read a model's committed embeddings from a cache file.

    Args:
        model: the group name (the model file's stem, e.g. ``efficientnet_lite0``); may be left out
            when the file holds one model.
        labelled_only: drop rows without a label.
        present_only: drop rows whose files the last ``featx embed`` of the folder found deleted (kept
            in the cache until --prune); their keys are in the result's ``gone``.
        rows: read only these row numbers (increasing), e.g. a sample chosen from :func:`load_labels`.
    """
    path = Path(path)
    with _read_h5(path) as f:
        model = _pick_model(f, path, model)
        g = f[model]
        columns, n = _committed_columns(g)
        pick = slice(0, n) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows is not None and len(pick) and (pick[0] < 0 or pick[-1] >= n or np.any(np.diff(pick) <= 0)):
            raise StoreError(f"rows must increase within 0..{n - 1}")
        # read as float32 by HDF5 itself: ``[pick].astype`` held a second copy of every row for a moment
        emb = columns["embeddings"].astype(np.float32)[pick]
        keys = _decode(columns["keys"][pick])
        labels = columns["labels"][pick].astype(np.int32)
        digests = _digests_of(columns, pick, len(keys))
        phashes = _phashes_of(columns, pick, len(keys))
        classes = _decode(g["class_names"][:])
        failures, attrs = _failures_of(g), _attrs_of(g)
        deleted = _gone_keys_of(g) if present_only else set()
    keep = labels >= 0 if labelled_only else np.ones(len(keys), dtype=bool)
    gone: list[str] = []
    if deleted:
        is_gone = np.array([k in deleted for k in keys], dtype=bool)
        gone = [k for k, ok in zip(keys, is_gone & keep) if ok]
        keep &= ~is_gone
    if not keep.all():
        emb, labels, phashes = take_rows_in_place(emb, np.flatnonzero(keep)), labels[keep], phashes[keep]
        keys, digests = [k for k, ok in zip(keys, keep) if ok], [d for d, ok in zip(digests, keep) if ok]
    return Embeddings(emb, keys, labels, classes, model, str(attrs["fingerprint"]), attrs, failures, digests, phashes,
                      gone)


def prune_command(folder: str | None, cache: str | os.PathLike) -> str:
    """`featx embed FOLDER -o CACHE --prune`, the command that drops the rows of files gone from a cache."""
    return f"`featx embed {folder or 'FOLDER'} -o {cache} --prune`"


def gone_line(gone: Sequence[str], folder: str | None, cache: str | os.PathLike) -> str:
    """What to tell a user of rows left out as gone (``gone``: their keys; :attr:`Embeddings.gone`): files deleted,
    or changed into files that cannot be read, since they were embedded."""
    n = len(gone)
    return (f"{n:,} row{'s' if n > 1 else ''} of files deleted from {folder or 'the folder'}, or unreadable now, since "
            f"{'they were' if n > 1 else 'it was'} embedded (e.g. {gone[0]}) left out; "
            f"{prune_command(folder, cache)} drops them from the cache")


def gone_keys(path: str | os.PathLike, model: str | None = None) -> list[str]:
    """Keys of the rows whose files the last ``featx embed`` of the folder found deleted (kept until --prune)."""
    path = Path(path)
    with _read_h5(path) as f:
        return sorted(_gone_keys_of(f[_pick_model(f, path, model)]), key=os.fsencode)


def gone_rows(path: str | os.PathLike, model: str | None = None) -> np.ndarray:
    """bool (n,) per committed row: its file the last ``featx embed`` of the folder found deleted (the row
    is kept until --prune). All False in a cache from before featx recorded it."""
    path = Path(path)
    with _read_h5(path) as f:
        g = f[_pick_model(f, path, model)]
        return _gone_mask(g, *_committed_columns(g))


def _gone_keys_of(g) -> set[str]:
    return set(_decode(g[_GONE]["keys"][:])) if _GONE in g else set()


def _gone_mask(g, columns, n: int) -> np.ndarray:
    """bool (n,): the committed rows the group's gone record names (the keys read only where it names some)."""
    deleted = _gone_keys_of(g)
    if not deleted:
        return np.zeros(n, dtype=bool)
    return np.array([k in deleted for k in _decode(columns["keys"][:n])], dtype=bool)


def take_rows_in_place(X: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``X[positions]`` for increasing ``positions``, made by moving those rows to the front of X
    itself, a slice at a time; returns X's first ``len(positions)`` rows (a view: X is overwritten).
    A cache's matrix is the largest thing in memory: ``X[positions]`` would hold a second one. Where
    fewer than half the rows are taken, they are copied instead, so that X can be freed (a view would
    hold the whole of it: a million rows for the few thousand labelled ones).

    Safe in place because ``positions[i] >= i``: a slice is read whole before it is written, and
    every later read lies past what has been written."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and (positions[0] < 0 or np.any(np.diff(positions) <= 0) or positions[-1] >= len(X)):
        raise ValueError("positions must increase within the rows of X")
    if len(positions) < len(X) // 2:
        return X[positions]
    step = max(1, (1 << 24) // max(1, X[:1].nbytes))  # 16 MB of rows at a time
    for start in range(0, len(positions), step):
        part = positions[start:start + step]
        if part[0] != start or part[-1] != start + len(part) - 1:  # rows already in place stay
            X[start:start + len(part)] = X[part]
    return X[:len(positions)]


_CLASSES_NAMED = 30  # in info's line; past it, the first ones and the smallest (train-head needs 2 a class)


def _class_counts_line(counts: dict[str, int]) -> str:
    """'  N classes: a (12), b (7) …': every class up to 30; past that the first 30, how many more, the
    range of sizes and the 5 smallest classes (a line of 1,000 names said nothing)."""
    named = ", ".join(f"{name} ({n:,})" for name, n in list(counts.items())[:_CLASSES_NAMED])
    if len(counts) <= _CLASSES_NAMED:
        return f"  {len(counts)} classes: {named}"
    smallest = sorted(counts.items(), key=lambda kind: (kind[1], kind[0]))[:5]
    return (f"  {len(counts):,} classes of {min(counts.values()):,} to {max(counts.values()):,} images: {named} "
            f"… and {len(counts) - _CLASSES_NAMED:,} more; the smallest: "
            + ", ".join(f"{name} ({n:,})" for name, n in smallest))


def _digests_of(columns: dict, pick, n: int) -> list[str]:
    """The rows' content digests; "" for each row of a cache made before the column existed."""
    if _DIGESTS not in columns:
        return [""] * n
    return [_digest_text(d) for d in columns[_DIGESTS][pick]]


def _digest_text(digest: bytes) -> str:
    """A stored digest as text; "" (unknown: the row is only itself) where damage left bytes that are not ASCII."""
    try:
        return digest.decode("ascii")
    except UnicodeDecodeError:
        return ""


def unit_rows(X: np.ndarray) -> np.ndarray:
    """float32 (n, D): rows scaled to length 1 (a zero row stays zero), so that a matrix product gives
    cosine similarities; a float16 cache's rows are taken as float32, for BLAS."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]
    return X / np.where(norms > 0, norms, 1.0)


def check_finite(data: Embeddings, cache) -> None:
    """Refuse embeddings that are not all finite numbers (a damaged file; a model that overflowed in
    fp16) before a head or a map is fit on them: scikit-learn would fail deep inside with a traceback.
    Checked a block of rows at a time, so a cache of millions needs no second matrix of its size."""
    bad: list[int] = []
    for start in range(0, len(data.embeddings), 65536):
        bad.extend(start + np.flatnonzero(~np.isfinite(data.embeddings[start:start + 65536]).all(axis=1)))
    if bad:
        raise StoreError(f"{cache}: {len(bad):,} stored embedding(s) of {data.model} are not finite numbers (NaN or "
                         f"infinity), e.g. that of {data.keys[bad[0]]}: the file is damaged, or the model overflowed "
                         f"(fp16: embed without --half); {repair_said(cache, data.attrs.get('folder'))}")


def _phashes_of(columns: dict, pick, n: int) -> np.ndarray:
    """uint64 (n,): the rows' perceptual hashes; 0 for each row of a cache made before the column existed."""
    return columns[_PHASHES][pick].astype(np.uint64) if _PHASHES in columns else np.zeros(n, dtype=np.uint64)


def iter_embeddings(path: str | os.PathLike, model: str | None = None, *, rows_per_chunk: int = 16384,
                    with_digests: bool = False, with_phashes: bool = False, sort_key=None) -> Iterator[tuple]:
    """(keys, float32 embeddings) of a model's committed rows, ``rows_per_chunk`` at a time: a cache of
    millions of rows is read in bounded memory (:func:`load_embeddings` holds every row at once).
    ``with_digests``: (keys, embeddings, S64 content digests, b"" where unknown), and ``with_phashes``
    then the uint64 perceptual hashes (0 where unknown) after them. ``sort_key``: rows in
    the order of ``sort_key(key)`` (:func:`featx.data.walk_sort_key`: the order a walk meets their files)
    rather than the cache's, where re-runs append new, moved and copied files at the end; only the keys
    are held whole."""
    path = Path(path)
    with _read_h5(path) as f:
        g = f[_pick_model(f, path, model)]
        columns, n = _committed_columns(g)
        if sort_key is None:
            chunks = (slice(start, min(n, start + rows_per_chunk)) for start in range(0, n, rows_per_chunk))
        else:
            all_keys = _decode(columns["keys"][:n])
            order = np.array(sorted(range(n), key=lambda row: sort_key(all_keys[row])), dtype=np.int64)
            chunks = (order[start:start + rows_per_chunk] for start in range(0, n, rows_per_chunk))
        for rows in chunks:
            keys = _decode(columns["keys"][rows]) if sort_key is None else [all_keys[row] for row in rows]
            chunk = keys, _read_rows_past_damage(columns["embeddings"], rows, path).astype(np.float32)
            if with_digests:
                chunk += (_read_rows_past_damage(columns[_DIGESTS], rows, path) if _DIGESTS in columns
                          else np.zeros(len(chunk[0]), dtype=_DIGEST_DTYPE),)
            if with_phashes:
                chunk += (_read_rows_past_damage(columns[_PHASHES], rows, path) if _PHASHES in columns
                          else np.zeros(len(chunk[0]), dtype=np.uint64),)
            yield chunk


def _read_rows(dataset, rows: slice | np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for a slice or for row numbers in any order (HDF5 reads them increasing)."""
    if isinstance(rows, slice):
        return dataset[rows]
    increasing = np.sort(rows)
    return dataset[increasing][np.searchsorted(increasing, rows)]


def _read_rows_past_damage(dataset, rows: slice | np.ndarray, path: Path) -> np.ndarray:
    """:func:`_read_rows`, but the rows of a chunk that fails its checksum (bytes changed on disk after featx
    wrote them) read as "not known" (NaN embeddings, b"" digests, 0 hashes), said in a warning, rather than
    failing the whole read: a search leaves those rows out and a query embeds its file again, as for rows
    that hold NaN. (What fits on every row, a head or a map, refuses the file instead: load_embeddings.)"""
    values, failed = _rows_and_damage(dataset, rows)
    if failed.any():
        _logger.warning("%s: %d row(s) of %s fail their checksum (bytes changed on disk after featx wrote them): "
                        "taken as damaged; %s", path, int(failed.sum()), dataset.name.lstrip("/"), repair_said(path))
    return values


def _rows_and_damage(dataset, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``dataset[rows]``, bool per row: its chunk fails its checksum), the failed rows "not known" (NaN,
    b"" or 0)."""
    try:
        values = _read_rows(dataset, rows)
        return values, np.zeros(len(values), dtype=bool)
    except OSError as e:
        if _CHECKSUM_FAILED not in str(e):
            raise
    wanted = np.arange(*rows.indices(dataset.shape[0])) if isinstance(rows, slice) else np.asarray(rows, np.int64)
    unknown = {"f": np.nan, "S": b""}.get(dataset.dtype.kind, 0)  # b"": a digest "0" would make the rows copies
    values = np.full((len(wanted), *dataset.shape[1:]), unknown, dtype=dataset.dtype)
    failed = np.zeros(len(wanted), dtype=bool)
    step = dataset.chunks[0]
    for start in (np.unique(wanted // step) * step).tolist():
        inside = (wanted >= start) & (wanted < start + step)
        try:
            values[inside] = dataset[start:start + step][wanted[inside] - start]
        except OSError as e:
            if _CHECKSUM_FAILED not in str(e):
                raise
            failed |= inside
    return values, failed


def stored_rows_of(path: str | os.PathLike, model: str | None, files: Sequence[str | os.PathLike]
                   ) -> tuple[dict[int, int], dict[int, np.ndarray], dict[int, int]]:
    """Which of ``files`` the cache holds, by their place in ``files``: the row of each file under the
    folder the cache follows that has one, the stored float32 embedding of those whose row embeds the
    file as it is now (same size and mtime: what a re-run of embed would skip) and holds finite numbers
    (a damaged row is left to be embedded again from the file, and said), and those rows' perceptual
    hashes (0 where unknown)."""
    path = Path(path)
    with _read_h5(path) as f:
        g = f[_pick_model(f, path, model)]
        folder = _attrs_of(g).get("folder")
        wanted: dict[str, list[int]] = {}
        for i, file in enumerate(files):
            key = _key_under(folder, file) if folder else None
            if key is not None:
                wanted.setdefault(key, []).append(i)
        if not wanted:
            return {}, {}, {}
        columns, n = _committed_columns(g)
        by_key = _rows_by_key(columns, n)
        rows = {i: by_key[key] for key, places in wanted.items() if key in by_key for i in places}
        current = {}
        for i, (row, size, mtime_ns) in rows.items():
            try:
                st = os.stat(files[i])
            except OSError:
                continue
            if (size, mtime_ns) == (st.st_size, st.st_mtime_ns):
                current[i] = row
        read = sorted(set(current.values()))  # h5py reads increasing rows
        stored = dict(zip(read, _read_rows_past_damage(columns["embeddings"], np.array(read, dtype=np.int64),
                                                       path).astype(np.float32))) if read else {}
        damaged = {row for row, embedding in stored.items() if not np.isfinite(embedding).all()}
        if damaged:
            _logger.warning("%s: %d stored embedding(s) of %s are not finite numbers (NaN or infinity), e.g. that of "
                            "%s: embedded again from the file%s; the cache is damaged: %s", path,
                            len(damaged), g.name.lstrip("/"), _decode(columns["keys"][[min(damaged)]])[0],
                            "" if len(damaged) == 1 else "s", repair_said(path, folder))
        usable = {i: stored[row] for i, row in current.items() if row not in damaged}
        phashes = dict(zip(read, _phashes_of(columns, read, len(read)).tolist())) if read else {}
        return {i: row for i, (row, _, _) in rows.items()}, usable, {i: phashes[current[i]] for i in usable}


def _rows_by_key(columns, n: int) -> dict[str, tuple[int, int, int]]:
    """key -> (row, file size, mtime_ns) of the first ``n`` rows of a group's columns."""
    keys = _decode(columns["keys"][:n])
    sizes, mtimes = columns["file_size"][:n], columns["file_mtime_ns"][:n]
    return {k: (i, int(s), int(m)) for i, (k, s, m) in enumerate(zip(keys, sizes, mtimes))}


def _key_under(folder: str, file: str | os.PathLike) -> str | None:
    """``file``'s key in a cache of ``folder`` (its path relative to it, '/'-separated), or None outside
    it. The walk keys a file by the names it went through (a symlinked class folder by the link's
    name), so the path as given is tried first, then with its folder resolved (a link to the whole)."""
    file = os.path.abspath(file)
    for candidate in (file, os.path.join(os.path.realpath(os.path.dirname(file)), os.path.basename(file))):
        if os.path.commonpath([folder, candidate]) == folder and candidate != folder:
            return Path(os.path.relpath(candidate, folder)).as_posix()
    return None


def load_labels(path: str | os.PathLike, model: str | None = None) -> np.ndarray:
    """int32 (n,) class index of every committed row (-1 without a class), without reading the embeddings."""
    path = Path(path)
    with _read_h5(path) as f:
        columns, n = _committed_columns(f[_pick_model(f, path, model)])
        return columns["labels"][:n].astype(np.int32)


def load_digests(path: str | os.PathLike, model: str | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, SHA-256 digests (S64 hex, b"" where unknown) and perceptual hashes (uint64, 0 where unknown)
    of every committed row, without the embeddings."""
    path = Path(path)
    with _read_h5(path) as f:
        columns, n = _committed_columns(f[_pick_model(f, path, model)])
        digests = columns[_DIGESTS][:n] if _DIGESTS in columns else np.zeros(n, dtype=_DIGEST_DTYPE)
        return _decode(columns["keys"][:n]), digests, _phashes_of(columns, slice(0, n), n)


def rows_near(path: str | os.PathLike, model: str | None, phashes: np.ndarray) -> list[np.ndarray]:
    """For each of ``phashes`` (uint64, 0: none), int64 numbers of the committed rows whose perceptual hashes
    are within :data:`featx.data.NEAR_COPY_BITS` of it (the same picture resized, re-encoded or copied),
    increasing. Only the hash column is read (8 bytes a row): :func:`rows_at` reads the rows wanted."""
    path = Path(path)
    found = [np.zeros(0, dtype=np.int64) for _ in range(len(phashes))]
    with _read_h5(path) as f:
        columns, n = _committed_columns(f[_pick_model(f, path, model)])
        if _PHASHES not in columns or not n or not len(phashes):
            return found
        pairs = near_copy_pairs(np.asarray(phashes, dtype=np.uint64), columns[_PHASHES][:n].astype(np.uint64))
    for i, rows in _split_by_first(pairs):
        found[i] = np.sort(rows)
    return found


def _split_by_first(pairs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(i, the js of i's pairs) for each i of int64 (m, 2) pairs (i, j)."""
    order = np.argsort(pairs[:, 0], kind="stable")
    firsts, starts = np.unique(pairs[order, 0], return_index=True)
    for i, rows in zip(firsts.tolist(), np.split(pairs[order, 1], starts[1:])):
        yield i, rows


def rows_at(path: str | os.PathLike, model: str | None, rows: np.ndarray) -> tuple[list[str], np.ndarray,
                                                                                  np.ndarray, np.ndarray]:
    """Keys, float32 embeddings, S64 digests (b"" where unknown) and uint64 perceptual hashes (0 where
    unknown) of the committed ``rows`` (distinct int64 row numbers, in any order), in their order."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    with _read_h5(path) as f:
        columns, _ = _committed_columns(f[_pick_model(f, path, model)])

        def column(name: str, missing) -> np.ndarray:
            return _read_rows_past_damage(columns[name], rows, path) if name in columns and len(rows) else missing

        return (_decode(column("keys", [])),
                column("embeddings", np.zeros((0, columns["embeddings"].shape[1]))).astype(np.float32),
                column(_DIGESTS, np.zeros(len(rows), dtype=_DIGEST_DTYPE)),
                column(_PHASHES, np.zeros(len(rows), dtype=np.uint64)).astype(np.uint64))


def load_failures(path: str | os.PathLike, model: str | None = None) -> dict[str, str]:
    """key -> reason for each file a model's runs skipped (not retried until the file changes)."""
    path = Path(path)
    with _read_h5(path) as f:
        return _failures_of(f[_pick_model(f, path, model)])


@dataclass
class Copies:
    """Rows whose files had the same bytes (by their SHA-256), as :func:`find_copies` finds them."""

    keep: np.ndarray  # int64 positions: every row, less a copy of an earlier row with the same class
    n_copies: int  # rows left out of ``keep``
    across_classes: list[tuple[str, str]]  # (key, key) pairs of the same bytes under two classes

    def lines(self, cache: str, labels_csv: str | None = None, folder: str | None = None) -> list[str]:
        """What to tell a user: nothing when there are no copies. With ``labels_csv``, the classes
        compared were the label sets that file gives (a multi-label head). ``folder``: the cache's, named
        in the command that prunes it."""
        out = []
        if self.n_copies:
            out.append(f"{self.n_copies:,} row{'s are' if self.n_copies > 1 else ' is'} a copy of another row's file "
                       f"(same SHA-256 and {'labels' if labels_csv else 'class'}): counted once in training and "
                       "evaluation")
        if self.across_classes:
            a, b = self.across_classes[0]
            n = len(self.across_classes)
            files = f"{n:,} file{'s' if n > 1 else ''}"
            out.append(f"{files} with the same bytes have other labels in {labels_csv}, e.g. {a} and {b}: the head "
                       "is taught both" if labels_csv else
                       f"{files} stored under two classes with the same bytes, e.g. {a} and {b}: the same photo "
                       "filed twice, or moved to another class folder since "
                       f"({prune_command(folder, cache)} drops the rows of paths that are gone)")
        return out


def find_copies(keys, labels, digests, folder: str | os.PathLike | None = None) -> Copies:
    """Rows that embed the same bytes as an earlier row of the same class, and the same bytes under
    two classes. Identical bytes give identical embeddings, so a copy in both the training and the
    held-out split would be scored on what it trained on. Rows without a digest ("") count as distinct.
    ``digests``: str or bytes per row; only rows whose digest occurs more than once are looked at one by one.
    ``folder``: the folder the keys are relative to; of copies, a row whose file is still there is the one
    kept (a file renamed since its embed leaves the old name's row until --prune: a mistake listed under
    it could not be opened)."""
    digests = np.asarray(digests, dtype=_DIGEST_DTYPE)
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    shared = np.flatnonzero((counts[inverse.ravel()] > 1) & (digests != b""))
    if folder is not None and len(shared) and os.path.isdir(folder):
        gone = np.array([not os.path.lexists(os.path.join(folder, keys[i])) for i in shared.tolist()])
        shared = shared[np.argsort(gone, kind="stable")]
    first: dict[bytes, tuple[int, int]] = {}  # digest -> (label, row) of its first row
    seen: set[tuple[bytes, int]] = set()
    keep = np.ones(len(digests), dtype=bool)
    across = []
    for i in shared.tolist():
        digest, label = digests[i], int(labels[i])
        if (digest, label) in seen:
            keep[i] = False
            continue
        seen.add((digest, label))
        if digest in first and first[digest][0] != label:
            j = first[digest][1]
            across.append((keys[min(i, j)], keys[max(i, j)]))  # in row order: embedded first, first
        first.setdefault(digest, (label, i))
    return Copies(np.flatnonzero(keep), int((~keep).sum()), across)


def near_copy_pairs(phashes: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """int64 (m, 2): pairs (i, j) of images within :data:`featx.data.NEAR_COPY_BITS` bits of each other by
    their perceptual hashes: the same picture resized or re-encoded.
    ``phashes``, ``others``: uint64 (n,), (k,), 0 where not known (never matched). Without ``others``,
    the pairs within ``phashes`` (i < j); with it, i in ``phashes`` and j in ``others``.

    Not every pair is compared: the 64 bits are cut into ``NEAR_COPY_BITS + 1`` bands, and two hashes
    that differ in at most ``NEAR_COPY_BITS`` bits agree on at least one band whole, so only hashes sharing a band
    are compared (multi-index hashing; Norouzi et al., 2012).
    """
    from .data import NEAR_COPY_BITS

    within = NEAR_COPY_BITS
    a = np.asarray(phashes, dtype=np.uint64)
    b = a if others is None else np.asarray(others, dtype=np.uint64)
    found = [np.zeros((0, 2), dtype=np.int64)]
    known_a, known_b = np.flatnonzero(a != 0), np.flatnonzero(b != 0)
    hashes_a, hashes_b = a[known_a], b[known_b]
    for start, stop in zip(*_bands(within + 1)):
        mask = np.uint64((1 << (stop - start)) - 1)
        band_b = (hashes_b >> np.uint64(start)) & mask
        order = np.argsort(band_b, kind="stable")
        sorted_b = band_b[order]
        if others is None:  # each pair once: every hash against those after it in its bucket
            query = order
            left = np.arange(1, len(order) + 1)
            count = np.searchsorted(sorted_b, sorted_b, side="right") - left
        else:
            query = np.arange(len(known_a))
            band_a = (hashes_a >> np.uint64(start)) & mask
            left = np.searchsorted(sorted_b, band_a, side="left")
            count = np.searchsorted(sorted_b, band_a, side="right") - left
        for rows in _bounded_chunks(count, 1 << 22):  # candidate pairs held at once: memory stays bounded
            i = query[np.repeat(rows, count[rows])]
            offsets = np.arange(len(i)) - np.repeat(np.cumsum(count[rows]) - count[rows], count[rows])
            j = order[np.repeat(left[rows], count[rows]) + offsets]
            close = np.bitwise_count(hashes_a[i] ^ hashes_b[j]) <= within  # the pairs themselves are few
            i, j = known_a[i[close]], known_b[j[close]]
            found.append(np.stack([np.minimum(i, j), np.maximum(i, j)] if others is None else [i, j], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def _bands(n: int) -> tuple[list[int], list[int]]:
    """(starts, stops) of ``n`` bit ranges that cover 64 bits as evenly as they can."""
    edges = [round(64 * k / n) for k in range(n + 1)]
    return edges[:-1], edges[1:]


def _bounded_chunks(count: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Positions of ``count`` in consecutive runs whose counts sum to about ``limit`` (one position at least)."""
    ends = np.cumsum(count)
    start = 0
    while start < len(count):
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - count[start] + limit, side="right")))
        yield np.arange(start, stop)
        start = stop


def near_copy_counts(groups: np.ndarray) -> tuple[int, int]:
    """(images with a near copy, pictures they make) of :func:`near_copy_groups`' numbers."""
    sizes = np.bincount(groups)
    return int((sizes[groups] > 1).sum()), int((sizes > 1).sum())


def near_copy_groups(phashes: np.ndarray, also_linked: np.ndarray | None = None) -> np.ndarray:
    """int64 (n,): a group number for each image, shared by near copies (:func:`near_copy_pairs`), and by
    near copies of near copies; an image without any is a group of its own. ``also_linked``: int (m, 2)
    more pairs of rows to join (files with the same bytes)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(phashes)
    pairs = near_copy_pairs(phashes)
    if also_linked is not None:
        pairs = np.concatenate([pairs, also_linked])
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def picture_numbers(digests, phashes) -> np.ndarray:
    """int64 (n,): a number for each row, shared by the rows that show one picture: files with the same
    bytes (SHA-256), near copies, and copies of those (:func:`near_copy_groups`)."""
    digests = np.asarray(digests, dtype=_DIGEST_DTYPE)
    known = np.flatnonzero(digests != b"")
    _, first, inverse = np.unique(digests[known], return_index=True, return_inverse=True)
    same_bytes = np.stack([known[first[inverse.ravel()]], known], axis=1)  # each row linked to its digest's first
    return near_copy_groups(phashes, also_linked=same_bytes)


def copy_groups(digests, phashes) -> list[np.ndarray]:
    """int64 positions of the rows that show one picture (:func:`picture_numbers`), a group for every
    picture stored more than once. Each group in row order; the groups in no set order."""
    picture = picture_numbers(digests, phashes)
    shared = np.flatnonzero(np.bincount(picture)[picture] > 1)  # rows of pictures stored more than once
    order = shared[np.argsort(picture[shared], kind="stable")]  # each picture's rows together, in row order
    return np.split(order, np.flatnonzero(np.diff(picture[order])) + 1) if len(order) else []


@dataclass(frozen=True)
class CopyOf:
    """One file of a picture stored more than once, beside the picture's first file."""

    key: str
    copy: str  # "first" (the picture's first file in the folder's order), "same bytes" or "near copy"
    bits_apart: int | None  # its perceptual hash's from the first's; None where one has no hash

    def how(self) -> str:
        if self.copy == "same bytes":
            return "the same bytes"
        return self.copy if self.bits_apart is None else f"{self.copy}, {self.bits_apart} of 64 bits apart"


@dataclass
class CacheSummary:
    """One model group of a cache, without reading its embeddings: what :func:`summarize_cache` returns."""

    model: str
    rows: int
    embed_dim: int
    dtype: str
    class_counts: dict[str, int]  # rows per class, in class order
    unlabelled: int
    failures: dict[str, str]  # key -> reason: files skipped, not retried until they change
    attrs: dict
    copies: Copies | None = None  # rows of labelled files whose bytes another row embedded
    path: str = ""
    near_copies: int = 0  # labelled rows (less copies) with a near copy among them (near_copy_groups)
    pictures: int = 0  # the groups those near copies make
    unhashed: int = 0  # rows without a perceptual hash (embedded before featx kept them)
    gone: int = 0  # rows of files the last embed found deleted or unreadable (kept until --prune)
    # every picture stored more than once, when asked for: its files, the first in the folder's order first
    copy_groups: list[list[CopyOf]] | None = None
    # among the rows without a class: (pictures stored more than once, the images they make)
    unlabelled_copies: tuple[int, int] = (0, 0)
    checksummed: bool = True  # its embeddings' chunks carry checksums (caches from before featx wrote them do not)

    def text(self, *, list_failures: bool = False, listed_in: str | None = None) -> str:
        """Several lines; every failed file with ``list_failures``, and every picture stored more than once
        where :func:`summarize_cache` was asked for them; ``listed_in``: a file that holds that list
        instead, named in its place."""
        from collections import Counter

        lines = [f"{self.model}: {self.rows:,} embeddings, {self.embed_dim}-d {self.dtype}, "
                 f"backbone {self.attrs.get('backbone')}, created {self.attrs.get('created')} "
                 f"(featx {self.attrs.get('featx_version')}), fingerprint {self.attrs.get('fingerprint')}"]
        if "folder" in self.attrs:
            lines.append(f"  folder {self.attrs['folder']}")
        if self.class_counts:
            lines.append(_class_counts_line(self.class_counts))
        if self.unlabelled:
            lines.append(f"  {self.unlabelled:,} without a class (directly under the folder)")
        pictures, images = self.unlabelled_copies
        if pictures and self.copy_groups is None:
            lines.append(f"  {pictures:,} of them {'are pictures' if pictures > 1 else 'is a picture'} stored more than "
                         f"once ({images:,} files: the same bytes, or resized or re-encoded): --copies names them; "
                         f"`featx similar --groups --cache {self.path or 'CACHE'}` also groups pictures alike")
        if self.copies is not None:
            lines += [f"  {line}" for line in self.copies.lines(self.path, folder=self.attrs.get("folder"))]
        if self.near_copies:
            lines.append(f"  {self.near_copies:,} images are near copies of another (the same picture resized or "
                         f"re-encoded, or as alike), {self.pictures:,} picture{'s' if self.pictures != 1 else ''} "
                         "in all: train-head keeps each picture's copies on one side of its split"
                         + (" (--copies names them)" if self.copy_groups is None else ""))
        if self.gone:
            lines.append(f"  {self.gone:,} {'rows are of files' if self.gone > 1 else 'row is of a file'} the last "
                         "embed found deleted from the folder or unreadable: left out by train-head, map and "
                         f"evaluate, kept until {prune_command(self.attrs.get('folder'), self.path or 'CACHE')}")
        if self.unhashed:
            lines.append(f"  {self.unhashed:,} rows have no perceptual hash (embedded by a featx from before it kept "
                         "them, or a black image): their near copies are not found until `featx embed` runs on the "
                         "folder again, which hashes them")
        if not self.checksummed:
            lines.append("  its rows carry no checksums (made by a featx from before it wrote them): damage on disk "
                         "that leaves finite numbers goes unseen; embed the folder into a new file to have them")
        if self.failures:
            n = len(self.failures)
            lines.append(f"  {n:,} file{'s' if n > 1 else ''} failed (skipped until {'they change' if n > 1 else 'it changes'}"
                         ", or embed --retry-failed):")
            if list_failures and listed_in:
                lines.append(f"    (every file and why: {listed_in})")
            elif list_failures:
                from .data import printable

                lines += [f"    {printable(key)}: {reason}" for key, reason in sorted(self.failures.items())]
            else:
                reasons = Counter(self.failures.values()).most_common()
                lines += [f"    {count:,} x {reason}" for reason, count in reasons[:5]]
                if len(reasons) > 5:  # each file's own words (a random file's first bytes): counted, not listed
                    rest = sum(count for _, count in reasons[5:])
                    lines.append(f"    {rest:,} x {len(reasons) - 5:,} other reason{'s' if len(reasons) > 6 else ''}")
                lines.append("    (--failures lists every file)")
        if self.copy_groups is not None:
            from .data import printable

            n = len(self.copy_groups)
            lines.append(f"  {n:,} picture{'s' if n != 1 else ''} stored more than once"
                         + (f" ({sum(map(len, self.copy_groups)):,} images)" if n else "")
                         + (", each under its first file:" if n and not listed_in else ""))
            if n and listed_in:
                lines.append(f"    (their files: {listed_in})")
            for group in [] if listed_in else self.copy_groups:
                lines.append(f"    {printable(group[0].key)}")
                lines += [f"      {printable(c.key)}  ({c.how()})" for c in group[1:]]
        return "\n".join(lines)


def summarize_cache(path: str | os.PathLike, *, list_copies: bool = False) -> list[CacheSummary]:
    """Every model group of a cache: rows, classes with their counts, failures, copies and near copies
    among the labelled files, and pictures stored more than once among the others. Reads labels, digests,
    perceptual hashes and failures (keys only where one file sits under two classes), not the embeddings;
    finding near copies grows with the square of the rows (hashes that share a band are compared, and the
    bands' buckets fill): pairs among 100,000 random hashes 0.1 s, a million 7.8 s (``python
    benchmarks/near_copies.py``, its recorded run). ``list_copies``: also
    every picture stored more than once, among all rows, with its files (``copy_groups``; reads the keys)."""
    out = []
    with _read_h5(Path(path)) as f:
        if damaged := _damaged_groups(f):  # which model made them is unknown: nothing to tell of them
            raise _lost_fingerprint(path, damaged[0])
        for model in _model_groups(f):
            g = f[model]
            columns, n = _committed_columns(g)
            labels = columns["labels"][:n]
            classes = _decode(g["class_names"][:])
            counts = np.bincount(labels[labels >= 0], minlength=len(classes))
            labelled = np.flatnonzero(labels >= 0)
            raw = columns[_DIGESTS][:n] if _DIGESTS in columns else np.zeros(n, dtype=_DIGEST_DTYPE)
            copies = find_copies(labelled, labels[labelled], raw[labelled])  # keys: positions until needed
            if copies.across_classes:  # positions -> keys, read only now
                keys = _decode(columns["keys"][:n])
                copies.across_classes = [(keys[a], keys[b]) for a, b in copies.across_classes]
            phashes = _phashes_of(columns, slice(0, n), n)
            groups = near_copy_groups(phashes[labelled[copies.keep]])
            near_copies, pictures = near_copy_counts(groups)
            unlabelled = np.flatnonzero(labels < 0)
            shown_twice = copy_groups(raw[unlabelled], phashes[unlabelled]) if len(unlabelled) and not list_copies else []
            emb = columns["embeddings"]
            gone = int(_gone_mask(g, columns, n).sum())
            out.append(CacheSummary(model, n, int(emb.shape[1]), str(emb.dtype),
                                    {c: int(k) for c, k in zip(classes, counts) if k}, int((labels < 0).sum()),
                                    _failures_of(g), _attrs_of(g), copies, str(path),
                                    near_copies=near_copies, pictures=pictures,
                                    unhashed=int((phashes == 0).sum()), gone=gone,
                                    copy_groups=_named_copy_groups(columns, n, raw, phashes) if list_copies else None,
                                    unlabelled_copies=(len(shown_twice), sum(map(len, shown_twice))),
                                    checksummed=emb.fletcher32))
    return out


def _named_copy_groups(columns, n: int, digests: np.ndarray, phashes: np.ndarray) -> list[list[CopyOf]]:
    """:func:`copy_groups` by key, each group's first file first, in the order the folder is walked (rows
    are in the order they were stored: a copy's row comes after its run's batch)."""
    from .data import walk_sort_key

    keys = _decode(columns["keys"][:n])
    named = []
    for group in sorted((sorted(g, key=lambda i: walk_sort_key(keys[i])) for g in copy_groups(digests, phashes)),
                        key=lambda g: walk_sort_key(keys[g[0]])):
        first = group[0]
        named.append([CopyOf(keys[i], "first" if i == first else
                             "same bytes" if digests[i] == digests[first] and digests[i] != b"" else "near copy",
                             int(np.bitwise_count(phashes[i] ^ phashes[first])) if phashes[i] and phashes[first]
                             else None)
                      for i in group])
    return named


class EmbeddingStore:
    """Writer for one model's group. Use as a context manager; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, model: str, *, info, half: bool = False,
                 folder: str | os.PathLike | None = None, new_folder: bool = False,
                 model_file: str | os.PathLike | None = None):
        """``folder``: the folder this run embeds. Keys are paths relative to it, so a cache follows one
        folder: another one is refused while the first is still there (a file at the same path in both
        would take the other's row), unless ``new_folder`` (a copy that now stands for it). A folder
        inside the one followed is a part of it: ``self.folder`` is the one followed, and
        ``self.subfolder`` the part's path in it ('/'-separated; "" for the whole).
        ``model_file``: the exported file that embeds, recorded so that ``similar`` and the heads trained
        here find it without --model."""
        self.path = Path(path)
        self.model = model
        self.info = info
        self.half = half
        self.folder, self.subfolder = (os.path.realpath(folder) if folder is not None else None), ""
        self.file = _open_h5(self.path, "a")
        try:
            with _damage_said(self.path):
                self._open_group()
                if folder is not None:
                    self._follow_folder(folder, new_folder)
                if model_file is not None:
                    self._set_path_attr("model_file", model_file)
        except BaseException:
            self.file.close()
            raise

    # ------------------------------------------------------------------ open / recover
    def _open_group(self) -> None:
        f = self.file
        fingerprint = self.info.fingerprint
        if self.model in f and "fingerprint" not in f[self.model].attrs:
            if _holds_rows(f[self.model]):
                raise _lost_fingerprint(self.path, self.model)
            # no rows: its making was cut short (killed) before its attributes were written; made again
            del f[self.model]
        if self.model in f:
            g = f[self.model]
            theirs = g.attrs.get("fingerprint")
            theirs = theirs.decode() if isinstance(theirs, bytes) else theirs
            if theirs != fingerprint:
                raise StoreError(
                    f"{self.path} group {self.model!r} was made with model fingerprint {theirs}, this run uses "
                    f"{fingerprint} (other weights, preprocessing or precision); use another --out or a new model name"
                )
            if g["embeddings"].dtype != np.dtype(np.float16 if self.half else np.float32):
                raise StoreError(
                    f"{self.path} group {self.model!r} stores {g['embeddings'].dtype} embeddings; "
                    f"this run asked for {'float16 (--half)' if self.half else 'float32'}"
                )
            for group in (g, g["failures"]):
                self._recover_rewrite(group)
                self._truncate_uncommitted(group)
            for column in (_DIGESTS, _PHASHES):  # a cache from before they were kept: unknown for its rows
                if column not in g:
                    self._create_column(g, column, int(g.attrs["n_rows"]))
        else:
            g = f.create_group(self.model)
            d = self.info.embed_dim
            g.create_dataset("embeddings", (0, d), maxshape=(None, d), chunks=(CHUNK_ROWS, d),
                             dtype=np.float16 if self.half else np.float32, **_CHECKSUMMED)
            for group in (g, g.create_group("failures")):
                group.create_dataset("keys", (0,), maxshape=(None,), chunks=(1024,), dtype=_str_dtype())
                group.create_dataset("file_size", (0,), maxshape=(None,), chunks=(1024,), dtype=np.int64, **_CHECKSUMMED)
                group.create_dataset("file_mtime_ns", (0,), maxshape=(None,), chunks=(1024,), dtype=np.int64, **_CHECKSUMMED)
                group.attrs["n_rows"] = 0
            g.create_dataset("labels", (0,), maxshape=(None,), chunks=(1024,), dtype=np.int32, **_CHECKSUMMED)
            for column in (_DIGESTS, _PHASHES):
                self._create_column(g, column, 0)
            g["failures"].create_dataset("reasons", (0,), maxshape=(None,), chunks=(1024,), dtype=_str_dtype())
            g.create_dataset("class_names", (0,), maxshape=(None,), dtype=_str_dtype())
            g.attrs.update(
                fingerprint=fingerprint,
                backbone=self.info.backbone,
                embed_dim=d,
                precision=self.info.precision,
                preprocess=self.info.preprocess.to_json(),
                weights_sha256=self.info.weights_sha256,
                featx_version=__version__,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            f.flush()
        self.group = g
        self.class_names = _decode(g["class_names"][:])

    def _follow_folder(self, folder: str | os.PathLike, new_folder: bool) -> None:
        here = os.path.realpath(folder)
        stored = self.group.attrs.get("folder")
        if stored is not None:
            stored = os.fsdecode(bytes(stored))
            if stored == here or (os.path.isdir(stored) and os.path.samefile(stored, here)):
                self.folder = stored
                return
            if os.path.isdir(stored) and not new_folder:
                common = os.path.commonpath([stored, here])
                # a part of the folder (one class, new photos of one): its files take the keys and classes
                # the whole folder gives them
                if common == stored:
                    self.folder, self.subfolder = stored, Path(os.path.relpath(here, stored)).as_posix()
                    return
                if common == here:
                    raise StoreError(
                        f"{self.path} holds the embeddings of {stored} ({self.model}), which is inside {here}: its "
                        f"keys are paths relative to {stored}. `featx embed {here} -o {self.path} --new-folder "
                        f"--prune` makes it the cache of {here} (its rows reused by content, not decoded again)")
                raise StoreError(
                    f"{self.path} holds the embeddings of {stored} ({self.model}), keyed by paths relative to "
                    f"it: the files of {here} would take the rows of its files at the same paths. Use another "
                    f"cache for {here}, or `featx embed {here} -o {self.path} --new-folder` if it now stands for "
                    f"{stored} (a copy: rows are reused by content)")
            _logger.info("%s was made from %s%s: it follows %s from now on", self.path, stored,
                         "" if os.path.isdir(stored) else ", which is gone", here)
        self._set_path_attr("folder", here)

    def _set_path_attr(self, name: str, path: str | os.PathLike) -> None:
        """An absolute path as an attribute: bytes, as the file system names it (a name need not be UTF-8)."""
        value = np.bytes_(os.fsencode(os.path.abspath(path)))
        if self.group.attrs.get(name) != value:
            with self._writing():
                self.group.attrs[name] = value
                self.file.flush()

    def record_gone(self, keys: Sequence[str]) -> None:
        """Keep the keys of rows whose files this run's finished walk did not meet (deleted, or renamed:
        kept until --prune), so that train-head, map and evaluate leave them out. A walk of a subfolder answers
        for the keys under it alone; the others stand as the last walk of them left them."""
        g = self.group
        kept = set()
        if self.subfolder:
            part = self.subfolder + "/"
            kept = {k for k in _gone_keys_of(g) if not (k.startswith(part) or k == self.subfolder)}
        gone = sorted(kept | set(keys), key=os.fsencode)
        if not gone and _GONE not in g:
            return
        with self._writing():
            if _GONE in g:
                del g[_GONE]
            g.create_group(_GONE).create_dataset("keys", data=_encode(gone), dtype=_str_dtype())
            self.file.flush()

    def _create_column(self, group, name: str, n: int) -> None:
        """An identity column of ``n`` rows, each "not known" (b"", 0)."""
        with self._writing():
            group.create_dataset(name, (n,), maxshape=(None,), chunks=(1024,), dtype=_COLUMN_DTYPES[name], **_CHECKSUMMED)
            self.file.flush()

    @staticmethod
    def _truncate_uncommitted(group) -> None:
        n = int(group.attrs["n_rows"])
        for _name, ds in _row_datasets(group):
            if ds.shape[0] != n:
                _logger.warning("%s: dropping %d rows of a batch that was not committed", ds.name, ds.shape[0] - n)
                try:
                    ds.resize(n, axis=0)
                except (OSError, RuntimeError) as e:  # the last chunk, cut to size, fails its checksum: readers
                    if _CHECKSUM_FAILED not in str(e):  # stop at n_rows; a write into it (or --repair) says so
                        raise

    # ------------------------------------------------------------------ reading state
    def done(self) -> dict[str, tuple[int, int, int]]:
        """key -> (row, file size, mtime_ns) for every committed row."""
        return _rows_by_key(self.group, int(self.group.attrs["n_rows"]))

    def digests(self) -> np.ndarray:
        """S64 (n_rows,): the content digest (SHA-256 as ASCII hex) of every committed row; b"" where it is not known."""
        return self.group[_DIGESTS][:int(self.group.attrs["n_rows"])]

    def phashes(self, rows: np.ndarray | None = None) -> np.ndarray:
        """uint64: the perceptual hashes of committed ``rows`` (increasing; default: all), 0 where not known."""
        if rows is None:
            return self.group[_PHASHES][:int(self.group.attrs["n_rows"])]
        return self.group[_PHASHES][rows]

    def failed(self) -> dict[str, tuple[str, int, int]]:
        """key -> (reason, file size, mtime_ns) of recorded failures; the last record of a key wins."""
        g = self.group["failures"]
        n = int(g.attrs["n_rows"])
        out = {}
        for k, r, s, m in zip(_decode(g["keys"][:n]), _decode(g["reasons"][:n]), g["file_size"][:n], g["file_mtime_ns"][:n]):
            out[k] = (r, int(s), int(m))
        return out

    # ------------------------------------------------------------------ writing
    def label_index(self, names: list[str]) -> dict[str, int]:
        """Index of each class name; names new to the store are appended (existing indices never move)."""
        new = [n for n in names if n not in self.class_names]
        if new:
            ds = self.group["class_names"]
            with self._writing():
                ds.resize(len(self.class_names) + len(new), axis=0)
                ds[len(self.class_names):] = _encode(new)
                self.file.flush()
            self.class_names += new
        return {n: i for i, n in enumerate(self.class_names)}

    def append(self, keys: list[str], embeddings: np.ndarray, labels, sizes, mtimes,
               digests: list[str] | None = None, phashes: np.ndarray | None = None) -> None:
        """Commit one batch: float32 (k, D) embeddings with their keys, labels and file identities
        (size, mtime_ns, the SHA-256 hex of the bytes embedded, and the uint64 perceptual hash of the
        image; None: not known)."""
        if not keys:
            return
        g = self.group
        n, k = int(g.attrs["n_rows"]), len(keys)
        columns = {
            "embeddings": np.asarray(embeddings, dtype=g["embeddings"].dtype),
            "keys": _encode(keys),
            "labels": np.asarray(labels, dtype=np.int32),
            "file_size": np.asarray(sizes, dtype=np.int64),
            "file_mtime_ns": np.asarray(mtimes, dtype=np.int64),
            _DIGESTS: _digest_column(digests, k),
            _PHASHES: _phash_column(phashes, k),
        }
        self._commit(g, n, k, columns)

    def replace(self, rows: list[int], embeddings: np.ndarray, labels, sizes, mtimes,
                digests: list[str] | None = None, phashes: np.ndarray | None = None) -> None:
        """Overwrite rows of changed files in place; identity is written last, so a kill re-embeds them."""
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        g = self.group
        with self._writing():
            g["embeddings"][idx] = np.asarray(embeddings, dtype=g["embeddings"].dtype)[order]
            g["labels"][idx] = np.asarray(labels, dtype=np.int32)[order]
            self.file.flush()
            g[_DIGESTS][idx] = _digest_column(digests, len(rows))[order]
            g[_PHASHES][idx] = _phash_column(phashes, len(rows))[order]
            g["file_size"][idx] = np.asarray(sizes, dtype=np.int64)[order]
            g["file_mtime_ns"][idx] = np.asarray(mtimes, dtype=np.int64)[order]
            self.file.flush()

    def set_phashes(self, rows: np.ndarray, phashes: np.ndarray) -> None:
        """Perceptual hashes for committed ``rows`` that had none (their files decoded again, unchanged)."""
        order = np.argsort(rows)
        with self._writing():
            self.group[_PHASHES][np.asarray(rows)[order]] = np.asarray(phashes, dtype=np.uint64)[order]
            self.file.flush()

    def touch(self, rows: list[int], mtimes) -> None:
        """New mtimes for rows whose file kept its bytes (checked by digest): skipped unread from then on."""
        order = np.argsort(rows)
        with self._writing():
            self.group["file_mtime_ns"][np.asarray(rows)[order]] = np.asarray(mtimes, dtype=np.int64)[order]
            self.file.flush()

    def add_failures(self, keys: list[str], reasons: list[str], sizes, mtimes) -> None:
        if not keys:
            return
        g = self.group["failures"]
        columns = {
            "keys": _encode(keys),
            "reasons": _encode(reasons),
            "file_size": np.asarray(sizes, dtype=np.int64),
            "file_mtime_ns": np.asarray(mtimes, dtype=np.int64),
        }
        self._commit(g, int(g.attrs["n_rows"]), len(keys), columns)

    def _check_room(self, columns: dict[str, np.ndarray]) -> None:
        """Refuse a batch the disk (or the process's file-size limit) cannot take, before HDF5 is touched.

        A write that the OS refuses half-way leaves HDF5's metadata cache unwritable, and the
        library can then crash the process at exit; checking first keeps the failure one clean line.
        """
        import resource
        import shutil

        row_bytes = sum(v.nbytes for v in columns.values())
        chunk = CHUNK_ROWS * self.info.embed_dim * (2 if self.half else 4)  # a new chunk may be allocated
        needed = row_bytes + chunk + 256 * 1024  # + HDF5 metadata for the grown datasets
        free = shutil.disk_usage(self.path.parent).free
        size = self.path.stat().st_size
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            free = min(free, limit - size)
        if free < needed:
            raise StoreError(f"{self.path}: no room for the next batch ({free / 2**20:.1f} MiB left, "
                             f"{needed / 2**20:.1f} MiB needed): free some disk and run the same command again; "
                             f"rows committed before are intact")

    @contextlib.contextmanager
    def _writing(self):
        """Every write to the file goes through here: a failed one (disk full, I/O error) is one line."""
        try:
            yield
        except FeatxError:  # already said (StoreError is a RuntimeError too)
            raise
        except (OSError, RuntimeError) as e:  # h5py reports a failed flush (disk full) as RuntimeError
            if _CHECKSUM_FAILED in str(e):  # a partly filled chunk is read back to be written: it was damaged
                raise _damaged(self.path, e) from None
            raise StoreError(f"writing to {self.path} failed ({_reason(e)}); rows committed before are intact") from None

    def _commit(self, group, n: int, k: int, columns: dict[str, np.ndarray]) -> None:
        self._check_room(columns)
        with self._writing():
            for name, values in columns.items():
                ds = group[name]
                ds.resize(n + k, axis=0)
                ds[n:n + k] = values
            self.file.flush()
            group.attrs["n_rows"] = n + k  # the commit marker, written after the data
            self.file.flush()

    def rewrite_without(self, drop_keys: set[str], *, failures: bool = False) -> int:
        """Remove the rows of ``drop_keys`` (pruned files, or failures that since succeeded). Returns rows removed.

        Kill-safe: the kept rows are first copied into a staging group; a marker then says the copy
        is complete; the swap that follows only deletes and renames datasets, and a run killed during
        it is finished on the next open. Killed before the marker, the staging copy is discarded and
        the original rows stand. (HDF5 does not give back the space of deleted datasets: h5repack does.)
        """
        g = self.group["failures"] if failures else self.group
        n = int(g.attrs["n_rows"])
        keys = _decode(g["keys"][:n])
        keep = np.array([k not in drop_keys for k in keys], dtype=bool)
        removed = int(n - keep.sum())
        if not removed:
            return 0
        with self._writing():
            self._stage_rewrite(g, keep)
            self._finish_rewrite(g)
        return removed

    def drop_damaged_rows(self) -> list[str]:
        """Remove every row the cache cannot vouch for, so that the walk that follows embeds its file again:
        rows in a chunk that fails its checksum, in any column, and rows whose embedding is not finite;
        failure records in a damaged chunk are dropped too (their files are tried again). Reads every
        stored number once, a chunk at a time. Returns the keys of the rows removed."""
        dropped = []
        for failures in (False, True):
            g = self.group["failures"] if failures else self.group
            n = int(g.attrs["n_rows"])
            bad = np.zeros(n, dtype=bool)
            for name, ds in _row_datasets(g):
                if ds.dtype.kind not in "fiuS":  # keys and reasons: strings HDF5 keeps no checksum of
                    continue
                for start in range(0, n, ds.chunks[0] * 64):  # a bounded block of rows at a time
                    rows = slice(start, min(n, start + ds.chunks[0] * 64))
                    values, failed = _rows_and_damage(ds, rows)
                    bad[rows] |= failed
                    if name == "embeddings":
                        bad[rows] |= ~np.isfinite(values).all(axis=1)
            if bad.any():
                keys = _decode(g["keys"][:n])
                drop = {keys[i] for i in np.flatnonzero(bad)}
                self.rewrite_without(drop, failures=failures)
                if not failures:
                    dropped = sorted(drop, key=os.fsencode)
        return dropped

    def _stage_rewrite(self, g, keep: np.ndarray) -> None:
        n = int(g.attrs["n_rows"])
        if _STAGING in g:
            del g[_STAGING]
        staging = g.create_group(_STAGING)
        for name, ds in _row_datasets(g):
            values, failed = _rows_and_damage(ds, slice(0, n))
            if (failed & keep).any():  # only rows being dropped (--repair's) may be past repair
                del g[_STAGING]
                raise _checksum_failed(self.path)
            staging.create_dataset(name, data=values[keep], maxshape=ds.maxshape, chunks=ds.chunks,
                                   fletcher32=ds.fletcher32)
        staging.attrs["n_rows"] = int(keep.sum())
        self.file.flush()
        g.attrs[_STAGED] = True  # the copy is complete: from here on the rewrite is finished, never undone
        self.file.flush()

    def _finish_rewrite(self, g) -> None:
        staging = g[_STAGING]
        for name in list(staging):
            if name in g:
                del g[name]
            g.move(f"{_STAGING}/{name}", name)
        g.attrs["n_rows"] = int(staging.attrs["n_rows"])
        del g.attrs[_STAGED]
        del g[_STAGING]
        self.file.flush()

    def _recover_rewrite(self, g) -> None:
        """A rewrite a kill cut short: finish it when its copy was complete, else drop the copy."""
        if g.attrs.get(_STAGED) and _STAGING in g:
            _logger.warning("%s: finishing a prune that was interrupted", g.name)
            self._finish_rewrite(g)
        elif _STAGING in g:
            _logger.warning("%s: discarding an interrupted prune's partial copy; nothing was removed", g.name)
            del g[_STAGING]
            self.file.flush()
        elif _STAGED in g.attrs:
            del g.attrs[_STAGED]
            self.file.flush()

    def close(self) -> None:
        if not self.file.id.valid:
            return
        try:
            with self._writing():
                self.file.flush()
        finally:
            try:
                self.file.close()
            except (OSError, RuntimeError):
                pass  # the flush above already failed: that is the error to report

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except StoreError:
            if exc_type is None:
                raise  # otherwise the error already on its way (e.g. the failed write) is the one to report
        if exc is not None and _raised_by_h5py(exc):  # a read of stored rows inside the block (rows reused)
            raise _damaged(self.path, exc) from None


# keys of rows whose files the last walk found deleted: a group, so that no per-row code takes it for a column
_GONE = "gone"
_DIGESTS = "file_sha256"
_DIGEST_DTYPE = "S64"  # fixed-length ASCII: a SHA-256 in hex


_PHASHES = "image_phash"
_COLUMN_DTYPES = {_DIGESTS: _DIGEST_DTYPE, _PHASHES: np.uint64}


def _digest_column(digests: list[str] | None, k: int) -> np.ndarray:
    return np.asarray(digests if digests is not None else [""] * k, dtype=_DIGEST_DTYPE)


def _phash_column(phashes: np.ndarray | None, k: int) -> np.ndarray:
    return np.asarray(phashes, dtype=np.uint64) if phashes is not None else np.zeros(k, dtype=np.uint64)


_STAGING = "_rewrite"  # group of compacted copies during a prune
_STAGED = "rewrite_staged"  # attribute: the staging copy is complete


def _committed_columns(group):
    """({column: dataset}, committed rows) as a reader should see them: when a prune was cut short
    after its copy was complete, the copy is what counts (the next writer finishes the swap)."""
    columns = dict(_row_datasets(group))
    if group.attrs.get(_STAGED) and _STAGING in group:
        staging = group[_STAGING]
        return {**columns, **dict(_row_datasets(staging))}, int(staging.attrs["n_rows"])
    return columns, int(group.attrs["n_rows"])


def _row_datasets(group):
    """(name, dataset) of the per-row columns of a group (not class_names, not subgroups)."""
    return [(name, ds) for name, ds in group.items()
            if hasattr(ds, "shape") and ds.shape and name != "class_names"]


def _reason(error: BaseException) -> str:
    """h5py's message, down to the OS's words when it gives them ('File too large', 'No space left on device')."""
    import re

    text = str(error)
    found = re.search(r"error message = '([^']+)'", text)
    return found.group(1) if found else first_line(error)
