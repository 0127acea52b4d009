"""Every torchvision classification model through featx's export, with random weights: whether it exports and
passes the check against torch on the sample photos, or the one line that refuses it, and how long each took
(the model built, exported and checked). Writes export_torchvision.json.

    python benchmarks/export_torchvision.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=None, help="comma-separated names (default: all of torchvision's)")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import torchvision

    import featx
    from featx.bench import machine_description, write_record
    from featx.errors import FeatxError, first_line

    names = args.names.split(",") if args.names else sorted(torchvision.models.list_models(module=torchvision.models))
    record: dict = {"machine": machine_description(), "torchvision": torchvision.__version__, "models": {}}
    for name in names:
        folder = Path(tempfile.mkdtemp(prefix="featx-export-"))
        start = time.perf_counter()
        try:
            info = featx.export_onnx(featx.load_backbone(name, weights="none"), folder / f"{name}.onnx")
            result = {"exported": True, "embed_dim": info.embed_dim, "input_size": list(info.preprocess.input_size)}
        except FeatxError as e:
            result = {"exported": False, "refused": first_line(e)}
        except Exception as e:  # noqa: BLE001 - a traceback is what this script is here to find
            result = {"exported": False, "failed": f"{type(e).__name__}: {first_line(e)}"}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        record["models"][name] = result
        print(f"{name:24s} {result}", flush=True)
    record["exported"] = sum(r["exported"] for r in record["models"].values())
    record["not_exported"] = sorted(n for n, r in record["models"].items() if not r["exported"])
    write_record(record, args.out, "export_torchvision")


if __name__ == "__main__":
    main()
