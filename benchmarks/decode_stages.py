"""Where the end-to-end time goes before the model: each decode stage alone, on one JPEG folder.

    python benchmarks/decode_stages.py --device cuda [--n-jpegs 8000] [--batch-size 256] [--out DIR]

Measures, in one run: the folder walk (stat alone, and with the hashing that finds identical files);
the per-image header check (featx's JPEG marker scan against a PIL open);
file reads + header checks (threads); the batched JPEG decode alone (nvJPEG on CUDA, libjpeg-turbo
on the CPU) through TorchCodec and torchvision at several batch sizes, and TorchCodec from 1, 2 and 4
threads at once (torchvision's lock makes threads pointless there); resize + crop alone; the whole
GpuDecoder with each library; PIL decode + resize in 1, half and all-but-one worker processes and
threads (the CPU path decodes in threads); and the pipeline's decode stage with nvJPEG alone and
with CPU workers taking a share of the batches. The model is not run, so these are the ceilings the
end-to-end figure in `featx bench` works under.
``--device cpu`` runs the same steps with the CPU decoder, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import multiprocessing
import os
import time
from collections import Counter


def _rate(n: int, fn, sync=lambda: None) -> float:
    fn()  # warm-up: allocators, decoder handles, page cache
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-jpegs", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from featx.bench import bench_workspace, machine_description, write_record
    from featx.data import FileEntry, class_names_of, load_batch, read_image_file, walk_images
    from featx.gpudecode import GpuDecoder, _read, available_jpeg_libraries, nvjpeg_pixels
    from featx.pipeline import PendingFiles, RunStats, _gpu_decode_ahead, default_workers
    from featx.runtime import read_model_info
    from featx.store import EmbeddingStore

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tmp, model_file, root = bench_workspace("featx-decode-bench-", args.n_jpegs)
    cfg = read_model_info(model_file).preprocess
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    n, bs = len(paths), args.batch_size
    batches = [paths[i:i + bs] for i in range(0, n, bs)]
    cores = os.cpu_count() or 2
    rec: dict = {"machine": machine_description(), "device": args.device, "n_jpegs": n, "batch_size": bs,
                 "cores": cores}

    # the per-image host check that decides what nvJPEG gets: featx's marker scan against opening the file
    # with PIL (what featx did before), one thread, on bytes already in memory
    raw = [_read(p, 10**9)[0] for p in paths]

    def pil_check(data) -> bool:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1

    for name, check in (("marker_scan", lambda b: nvjpeg_pixels(b, 10**9)), ("pil_open", pil_check)):
        rec[f"header_check_{name}_us_per_image"] = 1e6 / _rate(n, lambda: [check(b) for b in raw])

    # the walk that hands files on, on a fresh cache: os.scandir + stat alone, and featx's PendingFiles,
    # which also hashes each file whose size another file of the run shares (or a stored row's), so that each
    # content is embedded once; it runs in one thread (pipeline._walk_ahead), so it must stay far ahead
    sizes = Counter(os.path.getsize(p) for p in paths)
    rec["walk_files_sharing_a_size"] = sum(c for c in sizes.values() if c > 1) / n
    rec["walk_stat_only_per_s"] = _rate(n, lambda: sum(1 for _ in walk_images(root)))
    info = read_model_info(model_file)

    def walk_rate(cache: str, stored_sizes: bool) -> float:
        """Files/s of PendingFiles on a fresh cache; with ``stored_sizes``, on a cache holding a row of
        each file's size and other bytes (adding to a large cache): every file hashed, none matched."""
        with EmbeddingStore(tmp / cache, "walk", info=info) as store:
            if stored_sizes:
                store.append([f"old/{i}" for i in range(n)], np.zeros((n, info.embed_dim), np.float32), [-1] * n,
                             [os.path.getsize(p) for p in paths], [0] * n, digests=["0" * 64] * n)
            done, label_of = store.done(), store.label_index(class_names_of(root))
            t0 = time.perf_counter()
            handed_on = sum(1 for _ in PendingFiles(root, store, RunStats("", ""), set(), done, {}, label_of=label_of))
            return handed_on / (time.perf_counter() - t0)

    rec["walk_pending_files_per_s"] = walk_rate("walk-fresh.h5", False)
    rec["walk_pending_files_every_file_hashed_per_s"] = walk_rate("walk-hashed.h5", True)

    threads = cf.ThreadPoolExecutor(min(32, cores * 2))
    rec["read_hash_and_header_check_per_s"] = _rate(n, lambda: list(threads.map(_read, paths, [10**9] * n)))

    def read_and_check(path):  # the same without the SHA-256 the cache keeps: what hashing costs this stage
        data = read_image_file(path)
        return data, nvjpeg_pixels(data, 10**9)

    rec["read_and_header_check_without_hash_per_s"] = _rate(n, lambda: list(threads.map(read_and_check, paths)))
    blobs = [torch.frombuffer(b, dtype=torch.uint8) for b, _, _ in threads.map(_read, paths, [10**9] * n)]
    libraries = available_jpeg_libraries()
    rec["jpeg_libraries"] = libraries
    for lib in libraries:
        decoder = GpuDecoder(cfg, device=args.device, threads=min(32, cores * 2), library=lib)
        decode_list = decoder._decode_list  # the library's batched call alone
        for size in sorted({64, bs, 2 * bs}):
            rec[f"{lib}_decode_jpeg_batch{size}_per_s"] = _rate(n, lambda: [
                decode_list(blobs[i:i + size]) for i in range(0, n, size)], sync)
        if lib in ("torchcodec", "nvimgcodec"):  # batches from several threads at once, a decoder each
            for n_threads in (2, 4):
                with cf.ThreadPoolExecutor(n_threads) as decode_threads:
                    rec[f"{lib}_decode_jpeg_batch{bs}_{n_threads}_threads_per_s"] = _rate(n, lambda: list(
                        decode_threads.map(decode_list, [blobs[i:i + bs] for i in range(0, n, bs)])), sync)
        if lib == libraries[0]:
            one = torch.stack(decode_list(blobs[:bs]))
            rec["resize_crop_per_s"] = _rate(bs, lambda: decoder._resize_crop(one, *one.shape[2:]), sync)
        rec[f"gpudecoder_{lib}_whole_per_s"] = _rate(n, lambda: [decoder.decode(b) for b in batches], sync)
        decoder.close()

    context = multiprocessing.get_context("spawn")
    for workers in sorted({1, max(1, default_workers(gpu_decode=True)), default_workers()}):
        with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
            chunk = max(1, bs // 4)
            rec[f"cpu_pil_{workers}_workers_per_s"] = _rate(n, lambda: list(pool.map(
                load_batch, [paths[i:i + chunk] for i in range(0, n, chunk)], [cfg] * (-(-n // chunk)))))
        # the same in threads, as `featx embed` decodes on the CPU path (Pillow releases the GIL in decode
        # and resize); whether they keep up with processes at many cores decides the GPU path's CPU share
        with cf.ThreadPoolExecutor(workers) as pool:
            rec[f"cpu_pil_{workers}_threads_per_s"] = _rate(n, lambda: list(pool.map(
                load_batch, [paths[i:i + chunk] for i in range(0, n, chunk)], [cfg] * (-(-n // chunk)))))

    entries = [[FileEntry(key=p, path=p, label=None, size=0, mtime_ns=0) for p in b] for b in batches]
    for workers in sorted({0, max(1, default_workers(gpu_decode=True)), default_workers()}):
        pool = cf.ProcessPoolExecutor(workers, mp_context=context) if workers else None
        counts: dict[str, int] = {}

        def stage():
            counts.clear()
            for batch, decoded in _gpu_decode_ahead(iter(entries), cfg, args.device, 10**9, cpu_pool=pool,
                                                    cpu_workers=workers):
                counts[decoded.decoded_by] = counts.get(decoded.decoded_by, 0) + len(batch)

        rec[f"decode_stage_{workers}_cpu_workers_per_s"] = _rate(n, stage, sync)
        rec[f"decode_stage_{workers}_cpu_workers_share_cpu"] = counts.get("cpu", 0) / n
        if pool:
            pool.shutdown()
    write_record(rec, args.out, f"decode_stages-{'cuda' if cuda else 'cpu'}", plot_rates=True)


if __name__ == "__main__":
    main()
