"""embed_folder on Ray Data: decode in CPU tasks, embed in an actor pool, shards stitched into one cache.

The listing and the skip logic are the single-machine path's (data.walk_images, the store's done
keys). Decoding runs ``data.load_batch`` in Ray tasks, so bad files fail the same way; each actor
holds one onnxruntime session (on a GPU with ``num_gpus_per_worker``) and writes each batch it embeds
as a shard file, written under a ``.part`` name and renamed when complete. The driver then stitches
finished shards into the HDF5 store through ``EmbeddingStore.append`` (``replace`` for changed files),
which commits per batch; a shard is deleted only after its rows are committed, and rows of a file
version already in the store are skipped, so a killed run resumes.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from .backbones import DEFAULT_BACKBONE
from .data import DEFAULT_MAX_PIXELS, folder_to_walk, load_batch
from .errors import FeatxError
from .export import ensure_model_file
from .pipeline import NOT_FINITE_OUTPUT, PendingFiles, RunStats, classes_walked, finish_walk, hash_unhashed_rows
from .runtime import read_model_info
from .store import EmbeddingStore

_logger = logging.getLogger(__name__)


def _decode(batch: dict, *, cfg, max_pixels: int) -> dict:
    """Ray task: paths -> uint8 images (zeros where decoding failed) and an error column."""
    decoded = load_batch(list(batch["path"]), cfg, max_pixels)
    h, w = cfg.input_size
    images = np.zeros((len(batch["path"]), h, w, 3), dtype=np.uint8)
    images[decoded.ok] = decoded.images
    errors = np.array([""] * len(batch["path"]), dtype=object)
    for i, reason in decoded.failed:
        errors[i] = reason
    digests = np.array([""] * len(batch["path"]), dtype=object)
    digests[decoded.ok] = decoded.digests
    phashes = np.zeros(len(batch["path"]), dtype=np.uint64)
    phashes[decoded.ok] = decoded.phashes
    return {**{k: batch[k] for k in ("order", "key", "label", "size", "mtime")}, "image": images, "error": errors,
            "digest": digests, "phash": phashes}


class _Embedder:
    """Ray actor: one onnxruntime session; each batch becomes a shard file, renamed into place when complete."""

    def __init__(self, model_file: str, device: str, shard_dir: str, run: str):
        from .runtime import OnnxEngine

        self.engine = OnnxEngine(model_file, device=device)
        self.shard_dir, self.run = Path(shard_dir), run

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        dim = self.engine.info.embed_dim
        emb = self.engine.encode(batch["image"][ok]).embedding if ok.any() else np.zeros((0, dim))
        errors = np.array(batch["error"], dtype=object)
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():  # a failure of its file, as on one machine
            overflowed = np.flatnonzero(ok)[~finite]
            errors[overflowed] = NOT_FINITE_OUTPUT
            ok[overflowed] = False
            emb = emb[finite]
        # named by the run, then the batch's first position in its walk: name order is walk order
        name = f"{self.run}-{int(batch['order'][0]):012d}"
        part = self.shard_dir / f"{name}.part"
        with open(part, "wb") as f:  # str arrays of fixed width: the shard loads without pickle
            np.savez(f, ok=ok, embedding=emb.astype(np.float32), key=np.asarray(batch["key"], dtype=str),
                     label=batch["label"], size=batch["size"], mtime=batch["mtime"],
                     error=np.asarray(errors, dtype=str), digest=np.asarray(batch["digest"], dtype=str),
                     phash=batch["phash"])
            f.flush()
            os.fsync(f.fileno())
        # Renamed only when complete, so a .npz is never half written. An actor outlives its killed driver
        # by seconds: the next run's stitch then deletes its .part, and this rename fails in a dead job.
        os.replace(part, self.shard_dir / f"{name}.npz")
        return {"shard": np.array([name]), "n": np.array([len(ok)])}


def stitch_shards(shard_dir: Path, store: EmbeddingStore, run: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Commit every finished shard into the store, then delete it: new files are appended, files changed
    since their row was stored replace it in place, and rows of the very same file version are skipped.

    Shards go in name order (older runs first, each in walk order); ``run``'s own go first, so that a
    killed run's shard written late (its actors outlive their driver by seconds) does not take rows
    ahead of this run's walk order: its files are this run's too, and it adds only what is not stored.
    """
    shards = sorted(shard_dir.glob("*.npz"), key=lambda shard: (not (run and shard.name.startswith(run)), shard.name))
    if run is None:  # a killed run's shards, before the next run walks
        shards = _walk_prefixes(shards)
    done = store.done() if shards else {}  # the done keys are read only when there is something to stitch
    embedded, failures = 0, []
    for shard in shards:
        try:
            with np.load(shard) as z:
                ok, keys, errors = z["ok"], z["key"].tolist(), z["error"].tolist()
                embedding, label, size, mtime, digest, phash = (z[k] for k in ("embedding", "label", "size", "mtime",
                                                                               "digest", "phash"))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            # not ours or from an older featx (pickled keys): its files are not in the store, so are redone
            _logger.warning("shard %s unreadable (%s), deleted: its files are not in the cache, so the next run "
                            "embeds them", shard.name, e)
            shard.unlink()
            continue
        # A run's own shards, and a killed run's at the start of the next (in run order; the walk then
        # checks each file again), may rewrite a stored key. A late shard found after this run's own is
        # older than what they stored, so it only adds keys.
        may_replace = run is None or shard.name.startswith(run)

        def stored_as_is(i: int) -> bool:
            row = done.get(keys[i])
            return row is not None and (not may_replace or row[1:] == (int(size[i]), int(mtime[i])))

        emb_row = {i: r for r, i in enumerate(np.flatnonzero(ok))}
        new = [i for i in np.flatnonzero(ok) if keys[i] not in done]
        changed = [i for i in np.flatnonzero(ok) if keys[i] in done and not stored_as_is(i)]
        first_row = int(store.group.attrs["n_rows"])  # where append puts the new rows
        store.append([keys[i] for i in new], embedding[[emb_row[i] for i in new]], label[new], size[new], mtime[new],
                     digests=[digest[i] for i in new], phashes=phash[new])
        if changed:
            store.replace([done[keys[i]][0] for i in changed], embedding[[emb_row[i] for i in changed]],
                          label[changed], size[changed], mtime[changed], digests=[digest[i] for i in changed],
                          phashes=phash[changed])
        bad = [i for i in np.flatnonzero(~ok) if not stored_as_is(i)]
        store.add_failures([keys[i] for i in bad], [errors[i] for i in bad], size[bad], mtime[bad])
        for j, i in enumerate(new):
            done[keys[i]] = (first_row + j, int(size[i]), int(mtime[i]))
        for i in changed:
            done[keys[i]] = (done[keys[i]][0], int(size[i]), int(mtime[i]))
        embedded += len(new) + len(changed)
        failures += [(keys[i], errors[i]) for i in bad]
        shard.unlink()
    for leftover in [*shard_dir.glob("*.part"), *shard_dir.glob("*.done")]:  # cut short; markers of older featx
        leftover.unlink(missing_ok=True)
    return embedded, failures


def _walk_prefixes(shards: list[Path]) -> list[Path]:
    """Of killed runs' shards (name order), each run's that cover its walk from its first file on without a
    gap; the others are deleted. Its actors finish batches out of order, and rows stitched past a missing
    batch would stand ahead of that batch's files, which the next run embeds: the cache would not be in
    walk order, as an uninterrupted run's is (a head's split follows the rows' order)."""
    kept: list[Path] = []
    following: dict[str, int] = {}  # run -> the walk position its next shard must start at (-1: past a gap)
    for shard in shards:
        run, _, start = shard.stem.rpartition("-")
        try:
            with np.load(shard) as z:
                n = len(z["ok"])
            start_at = int(start)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            kept.append(shard)  # the stitch says what is wrong with it, and deletes it
            continue
        if start_at == following.get(run, 0):
            kept.append(shard)
            following[run] = start_at + n
        else:
            following[run] = -1
            _logger.info("shard %s left out: an earlier batch of its killed run did not finish, so its files are "
                         "embedded again, in walk order", shard.name)
            shard.unlink()
    return kept


def embed_folder_ray(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike = DEFAULT_BACKBONE,
    weights: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    num_gpus_per_worker: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    models_dir: str | os.PathLike | None = None,
    prune: bool = False,
    new_folder: bool = False,
    retry_failed: bool = False,
    repair: bool = False,
) -> RunStats:
    """The same result as :func:`featx.embed_folder`, computed on a Ray cluster.

    Args:
        address: a Ray cluster ("auto", "ray://host:10001"); None starts a local one.
        workers: embedding actors (default: one per GPU with GPUs, else 1).
        num_gpus_per_worker: GPUs each actor holds (its onnxruntime session then runs on CUDA).
        prune: remove rows of files no longer under ``root``.
        new_folder, retry_failed, repair: as for :func:`featx.embed_folder`.
    Shards go to ``OUT.shards/<model>/``, which must be on storage the workers and the driver share.
    """
    try:
        import ray
    except ImportError:
        raise FeatxError("the ray engine needs Ray: pip install 'featx[ray]'") from None
    root = folder_to_walk(root)
    # Ray schedules a task per batch and stage, so smaller batches mean more of them: kept at the 32 that
    # benchmarks/ray_vs_single.py measured (the CPU's default of 8 is not measured on Ray)
    batch_size = batch_size or 32
    start = time.perf_counter()
    model_file = ensure_model_file(model, weights=weights, models_dir=models_dir)
    info = read_model_info(model_file)
    group = Path(model_file).stem
    run = f"{time.time_ns():020d}"  # shard names sort by run
    stats = RunStats(out=str(out), model=group, batch_size=batch_size)
    shard_dir = Path(f"{out}.shards") / group
    shard_dir.mkdir(parents=True, exist_ok=True)

    with EmbeddingStore(out, group, info=info, folder=root, new_folder=new_folder, model_file=model_file) as store:
        stats.n_embedded, recovered_failures = stitch_shards(shard_dir, store)  # a killed run's finished shards
        stats.folder, stats.subfolder = store.folder, store.subfolder
        if repair:
            stats.repaired = store.drop_damaged_rows()
        label_of = store.label_index(classes_walked(store.folder, store.subfolder))
        done, failed_before = store.done(), store.failed()
        items, seen = [], set()
        pending = PendingFiles(store.folder, store, stats, seen, done, failed_before, label_of=label_of,
                               subfolder=store.subfolder, retry_failed=retry_failed)
        for item in pending:  # new files, and changed ones: their rows are replaced when stitched
            items.append({"order": len(items), "path": item.path, "key": item.key, "size": item.size,
                          "mtime": item.mtime_ns, "label": label_of[item.label] if item.label is not None else -1})
        stats.load_seconds = time.perf_counter() - start
        if items:
            if not ray.is_initialized():
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            gpus = float(ray.cluster_resources().get("GPU", 0))
            n_actors = workers or (max(1, int(gpus / num_gpus_per_worker)) if num_gpus_per_worker else 1)
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            ds = ray.data.from_items(items)
            ds = ds.map_batches(_decode, fn_kwargs={"cfg": info.preprocess, "max_pixels": max_pixels},
                                batch_size=batch_size, batch_format="numpy")
            ds = ds.map_batches(_Embedder, batch_size=batch_size, batch_format="numpy", concurrency=n_actors,
                                num_gpus=num_gpus_per_worker,
                                fn_constructor_kwargs={"model_file": str(Path(model_file).resolve()),
                                                       "device": "cuda" if num_gpus_per_worker else "cpu",
                                                       "shard_dir": str(shard_dir.resolve()), "run": run})
            for _ in ds.iter_batches(batch_size=None):
                pass
            n, failures = stitch_shards(shard_dir, store, run)
            stats.n_embedded += n
            stats.failures += failures
        stats.failures += recovered_failures
        pending.store_copies()
        hash_unhashed_rows(store, seen, info.preprocess, stats)
        # files that failed before and have a row now: their old failure records go
        fixed = pending.recovered | ({item["key"] for item in items if item["key"] in failed_before}
                                     - {key for key, _ in stats.failures})
        finish_walk(store, pending, root, out, prune=prune, recovered=fixed)
        stats.n_failed = len(stats.failures)  # walk failures, recovered shards' and this run's
    stats.seconds = time.perf_counter() - start
    return stats
