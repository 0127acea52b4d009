"""featx: frozen pretrained backbones, exported to ONNX, turning image folders into cached embeddings.

Importing featx is cheap: each name below is imported from its module on first use, so code that
only needs the runtime never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    # backbones
    "Backbone": "backbones",
    "PreprocessConfig": "backbones",
    "DEFAULT_BACKBONE": "backbones",
    "list_backbones": "backbones",
    "load_backbone": "backbones",
    "register_backbone": "backbones",
    # export
    "ModelInfo": "export",
    "export_onnx": "export",
    "ensure_model_file": "export",
    # runtime
    "Encoded": "runtime",
    "OnnxEngine": "runtime",
    "TorchEngine": "runtime",
    "load_model": "runtime",
    "read_model_info": "runtime",
    "BackoffEncoder": "runtime",
    "auto_batch_size": "runtime",
    "default_batch_size": "runtime",
    # which engine engine="auto" takes
    "calibrate": "calibration",
    "Calibration": "calibration",
    # data
    "as_rgb": "data",
    "decode_image": "data",
    "load_image": "data",
    "preprocess_image": "data",
    "walk_images": "data",
    # classification, embedding and the cache
    "classify": "pipeline",
    "iter_classify": "pipeline",
    "embed_folder": "pipeline",
    "embed_images": "pipeline",
    "RunStats": "pipeline",
    "load_embeddings": "store",
    "iter_embeddings": "store",
    "load_failures": "store",
    "load_labels": "store",
    "plot_embeddings": "embedmap",
    "EmbeddingMap": "embedmap",
    "find_similar": "search",
    "plot_by_class": "reports",
    "ClassSheet": "reports",
    "SimilarImages": "search",
    "write_similar": "search",
    "look_alike_groups": "search",
    "LookAlikes": "search",
    "write_look_alikes": "search",
    "Embeddings": "store",
    "summarize_cache": "store",
    "CacheSummary": "store",
    # heads
    "LogRegHead": "heads",
    "MLPHead": "heads",
    "ImageEmbedder": "heads",
    "load_head": "heads",
    "train_head": "heads",
    "evaluate_head": "predictions",
    "evaluate_classifier": "predictions",
    "HeadReport": "reports",
    "predict": "predictions",
    "iter_predictions": "predictions",
    "write_predictions": "pipeline",
    "describe_file": "info",
    "export_classifier": "predictions",
    "save_head": "heads",
    # fine-tuning
    "fine_tune": "finetune",
    "advise": "finetune",
    "model_blocks": "finetune",
    # benchmarks
    "bench_models": "bench",
    # errors
    "FeatxError": "errors",
    "WeightsError": "errors",
    "ModelFileError": "errors",
    "ImageError": "errors",
    "StoreError": "errors",
    "NotFittedError": "heads",
    "HeadMismatchError": "errors",
    "ExportCheckError": "errors",
    "UnknownBackboneError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .backbones import DEFAULT_BACKBONE, Backbone, PreprocessConfig, list_backbones, load_backbone, register_backbone
    from .errors import *  # noqa: F403
    from .export import ModelInfo, ensure_model_file, export_onnx
    from .calibration import Calibration, calibrate
    from .runtime import (BackoffEncoder, Encoded, OnnxEngine, TorchEngine, auto_batch_size, default_batch_size,
                          load_model, read_model_info)
    from .data import as_rgb, decode_image, load_image, preprocess_image, walk_images
    from .pipeline import RunStats, classify, embed_folder, embed_images, iter_classify, write_predictions
    from .store import (CacheSummary, Embeddings, iter_embeddings, load_embeddings, load_failures, load_labels,
                        summarize_cache)
    from .heads import ImageEmbedder, LogRegHead, MLPHead, NotFittedError, load_head, save_head, train_head
    from .reports import HeadReport
    from .predictions import evaluate_classifier, evaluate_head, export_classifier, iter_predictions, predict
    from .info import describe_file
    from .finetune import advise, fine_tune, model_blocks
    from .bench import bench_models
    from .embedmap import EmbeddingMap, plot_embeddings
    from .search import LookAlikes, SimilarImages, find_similar, look_alike_groups, write_look_alikes, write_similar
