"""Static int8 quantization of the default model against its fp32 file, in one run: why featx has no
int8 export.

    python benchmarks/int8_static.py [--methods MinMax,Percentile] [--n-calibration 64] [--n-digits 1200]
                                     [--out benchmarks/results/cpu]

onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) is calibrated on
generated 500x375 JPEGs (crops of the sample photos) and ``--n-calibration`` of scikit-learn's digits,
once per calibration method. Each int8 file is then set beside the fp32 file on:

- images/s at batch 8 (embed's CPU default), the two sessions taking turns pass by pass;
- the cosine of its embeddings to fp32's on the six sample photos and the head's 400 test digits (featx
  counts two engines as one model from 0.999);
- how often its top ImageNet class is fp32's on those photos;
- what a user gets: featx's logistic-regression head (C chosen by cross-validation) fit on 800 digits'
  embeddings and scored on 400 others (``--n-digits 1200``), with fp32's embeddings and with the int8 file's.

The calibration photos are crops of the same six photos scored here, which favours int8.
(``featx bench --int8`` times onnxruntime's dynamic quantization, which needs no calibration.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _digit_images(indices, cfg) -> np.ndarray:
    """uint8 (n, H, W, 3): scikit-learn digits at ``indices``, scaled as featx.samples.write_digits_folder does."""
    import sklearn.datasets
    from PIL import Image

    from featx.data import preprocess_image

    digits = sklearn.datasets.load_digits()
    images = [Image.fromarray((digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), mode="L")
              .resize((64, 64), Image.BILINEAR) for i in indices]
    return np.stack([preprocess_image(img, cfg) for img in images]), digits.target[list(indices)]


def _rates(sessions, batch: np.ndarray, seconds: float = 2.0, repeats: int = 5) -> list[float]:
    """Median images/s of each onnxruntime session on ``batch``, passes taking turns."""
    rates = [[] for _ in sessions]
    for s in sessions:
        s.run(None, {"images": batch})
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                s.run(None, {"images": batch})
                n += len(batch)
            rates[i].append(n / (time.perf_counter() - start))
    return [float(np.median(r)) for r in rates]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="MinMax,Percentile", help="onnxruntime CalibrationMethod names")
    parser.add_argument("--n-calibration", type=int, default=64, help="JPEGs, and as many digits")
    parser.add_argument("--n-digits", type=int, default=1200, help="two thirds train the head, a third scores it")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from featx.bench import bench_workspace, machine_description, write_record
    from featx.data import load_image, preprocess_image
    from featx.heads import LogRegHead
    from featx.runtime import read_model_info
    from featx.samples import sample_photos

    tmp, model_file, folder = bench_workspace("featx-int8-", n_jpegs=args.n_calibration)
    cfg = read_model_info(model_file).preprocess
    calibration = np.concatenate([
        np.stack([load_image(p, cfg) for p in sorted(folder.rglob("*.jpg"))]),
        _digit_images(range(1797 - args.n_calibration, 1797), cfg)[0]])
    photos = np.stack([preprocess_image(p, cfg) for p in sample_photos().values()])
    digits, labels = _digit_images(range(args.n_digits), cfg)  # calibration's digits are the last ones
    n_train = 2 * args.n_digits // 3

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the quantized graph's unused-initializer warnings, a line each
    fp32 = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    sessions = {"fp32": fp32}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs through the root logger, a paragraph per tensor
    try:
        for method in args.methods.split(","):
            out = tmp / f"int8-{method}.onnx"
            start = time.perf_counter()
            quantize_static(str(model_file), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method))
            print(f"int8 ({method}) quantized in {time.perf_counter() - start:.1f} s")
            sessions[f"int8_{method}"] = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    finally:
        root.setLevel(level)

    record = {"machine": machine_description(), "model": read_model_info(model_file).backbone,
              "calibration_images": len(calibration), "head_train_digits": n_train,
              "head_test_digits": args.n_digits - n_train, "batch_size": 8}
    batch = np.concatenate([photos, digits[:2]])[:8]
    for name, rate in zip(sessions, _rates(list(sessions.values()), batch, repeats=args.repeats)):
        record[f"{name}_per_s"] = rate
    fp32_embeddings = {}
    for name, session in sessions.items():
        photo_embedding, photo_logits = session.run(None, {"images": photos})
        # at embed's CPU batch size: in batches of 50 each file took 6.6 s for 150 digits, at 8 about 1 s
        digit_embedding = np.concatenate([session.run(None, {"images": digits[i:i + 8]})[0]
                                          for i in range(0, len(digits), 8)])
        head = LogRegHead().fit(digit_embedding[:n_train], labels[:n_train])  # C by 5-fold CV, as train-head does
        predicted = head.predict(digit_embedding[n_train:])
        record[f"{name}_digits_head_accuracy"] = float(np.mean(predicted == labels[n_train:]))
        if name == "fp32":
            fp32_embeddings = {"photos": (photo_embedding, photo_logits), "digits": digit_embedding}
            continue
        both = np.concatenate([photo_embedding, digit_embedding[n_train:]])
        reference = np.concatenate([fp32_embeddings["photos"][0], fp32_embeddings["digits"][n_train:]])
        cosine = (both * reference).sum(1) / np.linalg.norm(both, axis=1) / np.linalg.norm(reference, axis=1)
        record[f"{name}_cosine_to_fp32_min"] = float(cosine.min())
        record[f"{name}_cosine_to_fp32_mean"] = float(cosine.mean())
        record[f"{name}_top_class_as_fp32"] = float(np.mean(
            photo_logits.argmax(1) == fp32_embeddings["photos"][1].argmax(1)))
        record[f"{name}_vs_fp32_speed"] = record[f"{name}_per_s"] / record["fp32_per_s"]
    write_record(record, args.out, "int8_static-cpu")


if __name__ == "__main__":
    main()
