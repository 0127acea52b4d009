"""Torch backbone -> ONNX file with an ``embedding`` output (and ``logits`` where there is a classifier).

The file's input is uint8 RGB images, (n, H, W, 3): normalisation happens inside the graph, so
callers copy a quarter of the bytes of a float tensor and cannot get mean/std wrong. Everything
needed to use the file (preprocessing, class names, weights hash) travels in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .backbones import Backbone, PreprocessConfig
from .errors import ExportCheckError, FeatxError, ModelFileError, check_output_file, check_writable_folder, first_line

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

METADATA_KEY = "featx"
INPUT_NAME = "images"
# Largest |onnxruntime - torch| allowed, as a fraction of the largest |embedding| on the check images.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# fp32 up to ten times that where every check image's embeddings are this alike (cosine): summed in
# another order through a deep stack (timm's Visformer with seeded random weights: 1.4e-4, cosine 0.9999999)
# where an export that is wrong (a padding, a layer left out) is off by 1e-2 and more
FP32_NEAR = (1e-3, 0.99999)


@dataclass(frozen=True)
class ModelInfo:
    """What an exported file says about itself (its ``featx`` metadata)."""

    backbone: str
    embed_dim: int
    preprocess: PreprocessConfig
    class_names: list[str] | None
    weights: str
    weights_sha256: str
    precision: str  # "fp32" or "fp16" (compute precision inside the graph; outputs are float32)
    featx_version: str
    # the output that scores class_names: "logits" (a backbone's classifier), or "probabilities" in a
    # file from export_classifier, whose class_names are then its head's (metadata featx_classes)
    class_scores: str = "logits"
    multilabel: bool = False  # an export_classifier file of a multi-label head: sigmoid probabilities
    # uint64 perceptual hashes of the pictures its classifier was trained on (a fine-tuned export, an
    # export_classifier file), metadata featx_trained_phashes: evaluate leaves their copies out
    trained_phashes: np.ndarray | None = field(default=None, compare=False, repr=False)
    # an export_classifier file of a head that keeps class means (metadata featx_typical_cosine): an image
    # whose output class_mean_cosine is under this is unlike the head's training images; ``class_means``,
    # float32 (n_classes, embed_dim), read from the graph by featx.runtime.read_model_info
    typical_cosine: float | None = field(default=None, compare=False)
    class_means: np.ndarray | None = field(default=None, compare=False, repr=False)
    # read from the graph by featx.runtime.read_model_info, not the metadata: the file works timm's 'SAME'
    # padding out at every call (Ceil nodes; featx before 2026-11-25, :func:`_static_same_padding`), the
    # same model as today's export but 0.5-0.6x as fast on a CPU
    pads_per_call: bool = field(default=False, compare=False)
    # read from the graph by featx.runtime.read_model_info: torchvision's Inception v3 or GoogLeNet exported
    # by featx before 2026-12-07, without the input scaling their weights expect (transform_input): not
    # torchvision's model, its classes wrong; another fingerprint than today's export of the same weights
    unscaled_input: bool = field(default=False, compare=False)
    # its metadata names the crop mode (featx since 2026-12-07); an earlier featx's file says none, and one
    # of a timm model whose weights take another crop mode than the centre is outdated (outdated_export)
    crop_mode_said: bool = field(default=True, compare=False)
    # read_model_info found the digest of its weights (TENSORS_DIGEST_KEY) and checked them against it; an
    # earlier featx's file has none
    weights_checked: bool = field(default=False, compare=False)

    @property
    def has_logits(self) -> bool:
        """Whether the file scores classes (class_names), through logits or probabilities."""
        return self.class_names is not None

    @property
    def fingerprint(self) -> str:
        """Identity of what the embeddings mean: weights + preprocessing + precision, not the engine."""
        import hashlib

        h = hashlib.sha256(f"{self.weights_sha256}|{self.preprocess.identity_json()}|{self.precision}".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """One line: backbone, embedding size, logits, input size, precision, fingerprint."""
        classes = ""
        if self.has_logits:
            named = ", ".join(self.class_names[:10]) + (", …" if len(self.class_names) > 10 else "")
            kind = "logits for"
            if self.class_scores == "probabilities":
                kind = "a multi-label classifier: probabilities for each of" if self.multilabel else \
                    "a classifier: probabilities for"
            classes = f", {kind} {len(self.class_names)} {'labels' if self.multilabel else 'classes'} ({named})"
        trained = "" if self.trained_phashes is None else (
            f", knows the {len(self.trained_phashes):,} pictures it was trained and validated on (evaluate leaves them out)")
        unlike = "" if self.typical_cosine is None else (
            f", marks images unlike its training images (class_mean_cosine under {self.typical_cosine:.3f})")
        return (f"{self.backbone}, {self.embed_dim}-d embedding{classes}, "
                f"input {self.preprocess.input_size[0]}x{self.preprocess.input_size[1]}, {self.precision}, "
                f"fingerprint {self.fingerprint}{trained}{unlike}")

    def input_description(self) -> str:
        """What the file takes, for whoever runs it without featx: the shape and how a photo gets there
        (normalisation is inside the graph)."""
        pre = self.preprocess
        (h, w) = pre.input_size
        how = {"squash": f"{pre.resize_text()},", "border": f"{pre.resize_text()}, padded with RGB {pre.pad_fill},"
               }.get(pre.crop_mode, f"so its shorter side is {pre.resize_size},")
        return (f"uint8 RGB (n, {h}, {w}, 3): each photo resized ({pre.interpolation}) {how} then centre-cropped "
                f"to {h}x{w}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "backbone": self.backbone,
                "embed_dim": self.embed_dim,
                "preprocess": json.loads(self.preprocess.to_json()),
                "class_names": self.class_names,
                "weights": self.weights,
                "weights_sha256": self.weights_sha256,
                "precision": self.precision,
                "featx_version": self.featx_version,
                "input": self.input_description(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        d = json.loads(text)
        return cls(
            backbone=d["backbone"],
            embed_dim=int(d["embed_dim"]),
            preprocess=PreprocessConfig.from_json(json.dumps(d["preprocess"])),
            class_names=d["class_names"],
            weights=d["weights"],
            weights_sha256=d["weights_sha256"],
            precision=d["precision"],
            featx_version=d["featx_version"],
            crop_mode_said="crop_mode" in d["preprocess"],
        )

    @classmethod
    def from_backbone(cls, backbone: Backbone, *, half: bool = False) -> ModelInfo:
        return cls(
            backbone=backbone.name,
            embed_dim=backbone.embed_dim,
            preprocess=backbone.preprocess,
            class_names=backbone.class_names if backbone.classifier is not None else None,
            weights=backbone.weights,
            weights_sha256=backbone.weights_sha256(),
            precision="fp16" if half else "fp32",
            featx_version=__version__,
            trained_phashes=backbone.trained_phashes,
            typical_cosine=backbone.typical_cosine if backbone.class_means is not None else None,
        )


def embedding_model(backbone: Backbone, *, half: bool = False, dtype=None,
                    fixed_padding: bool = True) -> torch.nn.Module:
    """The module that is exported, and that the torch engine runs.

    Takes uint8 (n, H, W, 3) RGB; returns float32 (n, embed_dim) and, with a classifier,
    float32 (n, n_classes) logits. ``fixed_padding``: timm's TensorFlow-style 'SAME' convolutions
    padded by constants for the backbone's input size (:func:`_static_same_padding`); False keeps
    timm's own modules, the export check's reference.
    """
    import copy

    import torch

    compute_dtype = dtype or (torch.float16 if half else torch.float32)

    class EmbeddingModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            p = backbone.preprocess
            # mean/std scaled by 255 so uint8 pixels are normalised in one subtract and one divide
            self.register_buffer("mean", torch.tensor(p.mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(p.std).view(1, 3, 1, 1) * 255.0)
            features = copy.deepcopy(backbone.features)
            if fixed_padding:
                features = _static_same_padding(features, p.input_size)
            self.features = features.to(compute_dtype)
            self.classifier = (
                copy.deepcopy(backbone.classifier).to(compute_dtype) if backbone.classifier is not None else None
            )

        def forward(self, images: torch.Tensor):
            x = images.permute(0, 3, 1, 2).to(torch.float32)
            x = ((x - self.mean) / self.std).to(compute_dtype)
            embedding = self.features(x)
            if self.classifier is None:
                return embedding.float()
            return embedding.float(), self.classifier(embedding).float()

    return EmbeddingModel().eval()


def _static_same_padding(features: torch.nn.Module, input_size: tuple[int, int]) -> torch.nn.Module:
    """``features`` with timm's TensorFlow-style 'SAME' padding (the tf_ models, EfficientNet-Lite among
    them; NFNet's and BiT-style weight-standardised convolutions; NASNet's and PNASNet's pooling) padded
    by constants for ``input_size``, the one size the embedding model runs at. timm works that padding
    out from the input's shape on every call, which the exporter writes as Shape/Gather/Ceil/Pad nodes
    that onnxruntime runs as a separate Pad, with layout reorders around it (a third of
    EfficientNet-Lite0's time on a CPU). ``Conv2dSame`` becomes timm's own ``Conv2dSameExport``, which
    fixes its padding at its first call; the other layers get a constant pad in front, from the size
    each met in one forward pass (timm's ``pad_same_arg``). onnxruntime then folds a zero Pad into the
    convolution: the same embeddings, 1.5-1.9x the images/s on 2 CPU cores (``python
    benchmarks/same_padding.py``). Modified in place and returned."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.layers.padding import pad_same_arg
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame

    def replace(name: str, module: torch.nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(features.get_submodule(parent), leaf, module)

    same = [(name, m) for name, m in features.named_modules() if type(m) is Conv2dSame]
    for name, conv in same:
        fixed = Conv2dSameExport(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        fixed.load_state_dict(conv.state_dict())
        replace(name, fixed)
    padded_per_call = [(name, m) for name, m in features.named_modules()
                       if isinstance(m, (MaxPool2dSame, AvgPool2dSame))
                       or (isinstance(m, (StdConv2dSame, ScaledStdConv2dSame)) and m.same_pad)]
    if not same and not padded_per_call:
        return features
    sizes: dict[str, set] = {name: set() for name, _ in padded_per_call}
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: sizes[name].add(tuple(args[0].shape[-2:])))
             for name, m in padded_per_call]
    training = features.training
    try:
        with torch.no_grad():  # each Conv2dSameExport fixes its padding from the size it first sees
            features.eval()(torch.zeros(1, 3, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, m in padded_per_call:
        if len(sizes[name]) != 1:  # not run, or one module run at two sizes: left as timm wrote it
            continue
        dilation = getattr(m, "dilation", (1, 1))
        pads = pad_same_arg(list(next(iter(sizes[name]))), list(m.kernel_size), list(m.stride), list(dilation))
        if isinstance(m, MaxPool2dSame):
            value, layer = -float("inf"), torch.nn.MaxPool2d(m.kernel_size, m.stride, 0, dilation, m.ceil_mode)
        elif isinstance(m, AvgPool2dSame):
            value, layer = 0.0, torch.nn.AvgPool2d(m.kernel_size, m.stride, 0, m.ceil_mode, m.count_include_pad)
        else:  # the convolution itself, its weight standardisation included, without the per-call pad
            value, layer = 0.0, m
            m.same_pad = False
        replace(name, torch.nn.Sequential(torch.nn.ConstantPad2d(pads, value), layer) if any(pads) else layer)
    return features.train(training)


def check_images(preprocess: PreprocessConfig) -> np.ndarray:
    """Real photos (scikit-learn and scikit-image samples) preprocessed as the model expects: uint8 (n, H, W, 3)."""
    from .data import preprocess_image
    from .samples import sample_photos

    return np.stack([preprocess_image(img, preprocess) for img in sample_photos().values()])


TRAINED_PHASHES_KEY = "featx_trained_phashes"
# an export_classifier file of a head with class means: the cut-off of its class_mean_cosine output, and
# the initializer holding the means, (embed_dim, n_classes) float32
TYPICAL_COSINE_KEY = "featx_typical_cosine"
CLASS_MEANS_PREFIX = "head/"  # export_classifier prefixes its head's graph so; a fine-tuned export names it so too
CLASS_MEANS_NAME = f"{CLASS_MEANS_PREFIX}class_means"
# SHA-256 of the graph's weights as featx wrote them (tensors_digest), which read_model_info checks: a flipped
# bit or a block of zeros inside the weights still parses, and would give wrong embeddings under the right
# fingerprint; a file cut short is caught by protobuf
TENSORS_DIGEST_KEY = "featx_tensors_sha256"


def tensors_digest(proto) -> str:
    """:func:`featx.backbones.tensors_sha256` of ``proto``'s initializers in the graph's order (featx writes
    no external data: every initializer is in the file). ResNet-50's 100 MB: 0.14 s."""
    from onnx import numpy_helper

    from .backbones import tensors_sha256

    return tensors_sha256((tensor.name, numpy_helper.to_array(tensor)) for tensor in proto.graph.initializer)


def weights_damage(proto) -> str | None:
    """Why ``proto``'s weights are not those featx wrote (their digest differs from the recorded one), or None;
    None too for a file with no digest (featx before 2026-12-07, or another tool's)."""
    recorded = next((p.value for p in proto.metadata_props if p.key == TENSORS_DIGEST_KEY), None)
    if recorded is None or tensors_digest(proto) == recorded:
        return None
    return (f"its weights are not those featx wrote (the SHA-256 of its {len(proto.graph.initializer)} tensors "
            "differs): damaged on disk or in a copy, or changed by another tool since")


def save_model_file(proto, path: str | os.PathLike) -> None:
    """``onnx.save`` with the digest of the graph's weights in its metadata (TENSORS_DIGEST_KEY), replacing
    any copied from the file it was made from."""
    import onnx

    kept = [p for p in proto.metadata_props if p.key != TENSORS_DIGEST_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = TENSORS_DIGEST_KEY, tensors_digest(proto)
    onnx.save(proto, str(path))
    from .runtime import weights_written

    weights_written(path, proto)


def replace_model_file(written: str | os.PathLike, path: str | os.PathLike) -> None:
    """``os.replace`` of a file :func:`save_model_file` wrote, still counted as checked under its new name."""
    from .runtime import rename_written_file

    rename_written_file(written, path)


def class_mean_cosine_graph(means: np.ndarray, *, prefix: str = "") -> tuple[list, list]:
    """ONNX initializers and nodes from the graph's ``embedding`` to an output ``class_mean_cosine`` (n,):
    the embedding at unit length against each of ``means`` (n_classes, d; unit rows), the nearest one's
    cosine. ``prefix`` names the rest (the means: ``{prefix}class_means``). Only ops whose form has not
    changed since opset 13 (no Reduce*, whose axes moved to an input in 18)."""
    from onnx import helper, numpy_helper

    d = means.shape[1]
    inits = [numpy_helper.from_array(np.ones((d, 1), np.float32), f"{prefix}ones"),
             numpy_helper.from_array(np.ascontiguousarray(means.T, dtype=np.float32), f"{prefix}class_means"),
             numpy_helper.from_array(np.array([1], np.int64), f"{prefix}one"),
             numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}flat")]
    name = {n: f"{prefix}{n}" for n in ("squares", "norm2", "norm", "unit", "cosines", "nearest", "nearest_class")}
    nodes = [helper.make_node("Mul", ["embedding", "embedding"], [name["squares"]]),
             helper.make_node("MatMul", [name["squares"], f"{prefix}ones"], [name["norm2"]]),
             helper.make_node("Sqrt", [name["norm2"]], [name["norm"]]),
             helper.make_node("Div", ["embedding", name["norm"]], [name["unit"]]),
             helper.make_node("MatMul", [name["unit"], f"{prefix}class_means"], [name["cosines"]]),
             helper.make_node("TopK", [name["cosines"], f"{prefix}one"], [name["nearest"], name["nearest_class"]],
                              axis=1),
             helper.make_node("Reshape", [name["nearest"], f"{prefix}flat"], ["class_mean_cosine"])]
    return inits, nodes


def encode_phashes(phashes: np.ndarray) -> str:
    """uint64 (n,) as metadata text: base64 of their little-endian bytes (11 characters a picture)."""
    import base64

    return base64.b64encode(np.asarray(phashes, dtype="<u8").tobytes()).decode("ascii")


def decode_phashes(text: str) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<u8").astype(np.uint64)


def export_onnx(
    backbone: Backbone,
    path: str | os.PathLike,
    *,
    half: bool = False,
    opset: int = 17,
    check: bool = True,
    fixed_padding: bool = True,
) -> ModelInfo:
    """Write ``backbone`` to ``path`` as ONNX, check it against torch, and return its metadata.

    The write is atomic: the file appears at ``path`` only once it has passed the check, which compares
    it with timm's and torchvision's own modules. ``fixed_padding=False`` writes timm's 'SAME'
    padding as worked out at every call, as featx did before (benchmarks/same_padding.py times both).

    Raises:
        ExportCheckError: onnxruntime's outputs differ from torch's beyond ``TOLERANCE``.
    """
    import onnx
    import torch

    check_output_file(path, example=f"{backbone.name}.onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = ModelInfo.from_backbone(backbone, half=half)
    _check_fits_one_file(backbone, half=half)
    model = embedding_model(backbone, half=half, fixed_padding=fixed_padding)
    h, w = backbone.preprocess.input_size
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    with torch.no_grad():
        produced = model(example)
    width = (produced[0] if isinstance(produced, tuple) else produced).shape[-1]
    if width != info.embed_dim:  # the store sizes its rows by embed_dim: it would fail at the first batch
        raise ExportCheckError(f"{backbone.name}: the backbone gives {width}-d embeddings but declares "
                               f"embed_dim={info.embed_dim}")
    outputs = ["embedding", "logits"] if info.has_logits else ["embedding"]
    # in a folder of this export's own (two first runs may export one model at once; tensors the exporter
    # writes beside its file, external data for a graph near protobuf's 2 GB, go with it, not into the models
    # folder), the file created by the exporter with the user's umask: mkstemp's 0600 made the models
    # folder's files unreadable to the others sharing it (FEATX_MODELS on a group's server)
    partial = _partial_name(path)
    partial.mkdir()
    tmp = partial / path.name
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's fused fast path (ViT) has no ONNX symbolic: trace the plain ops
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice, not the user's concern
            # a model's Python branches on tensors, which the trace takes as constants: the model's shape is fixed
            # here, and the check against torch below is what tells whether the file is right
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # fixed 'SAME' padding's pads are reversed with a Slice of step -1, which the exporter says it
            # cannot fold; onnxruntime folds it when it loads the file (benchmarks/same_padding.py)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            # timm's weight-standardised convolutions (NFNet, BiT) standardise their weights with a
            # training-mode batch_norm: on constants, which onnxruntime folds when it loads the file
            warnings.filterwarnings("ignore", message="ONNX export mode is set to TrainingMode.EVAL, but operator "
                                    "'batch_norm' is set to train=True", category=UserWarning)
            _export_to_onnx(model, example, tmp, outputs, opset=opset, name=backbone.name)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, info.to_json()
        if info.trained_phashes is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = TRAINED_PHASHES_KEY, encode_phashes(info.trained_phashes)
        if backbone.class_means is not None and backbone.typical_cosine is not None and info.has_logits:
            # a fine-tuned model: how like its training images an image is, as a merged head's file says
            inits, nodes = class_mean_cosine_graph(backbone.class_means, prefix=CLASS_MEANS_PREFIX)
            proto.graph.initializer.extend(inits)
            proto.graph.node.extend(nodes)
            proto.graph.output.append(onnx.helper.make_tensor_value_info("class_mean_cosine", onnx.TensorProto.FLOAT,
                                                                         ["batch"]))
            entry = proto.metadata_props.add()
            entry.key, entry.value = TYPICAL_COSINE_KEY, repr(float(backbone.typical_cosine))
        proto.producer_name = "featx"
        save_model_file(proto, tmp)
        onnx.checker.check_model(str(tmp))
        if check:
            compare_with_torch(tmp, backbone, half=half)
        replace_model_file(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        shutil.rmtree(partial, ignore_errors=True)
    return info


ONNX_FILE_LIMIT = 2 ** 31  # protobuf's: a model's whole file is one message, of less than 2 GiB


def _check_fits_one_file(backbone: Backbone, *, half: bool) -> None:
    """Refuse, before any export work, a model whose weights alone pass :data:`ONNX_FILE_LIMIT`: featx writes
    every weight inside its one file (no external data). ViT-H/14 (632 M weights, 2.5 GB in float32) went
    through 2.4 minutes and 12 GB of export to a protobuf EncodeError, and left 200 tensor files beside it."""
    modules = [backbone.features] + ([backbone.classifier] if backbone.classifier is not None else [])
    tensors = {t.data_ptr(): t.numel() for m in modules for t in [*m.parameters(), *m.buffers()]}  # tied: once
    values = sum(tensors.values())
    size = values * (2 if half else 4)
    if size < ONNX_FILE_LIMIT:
        return

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    advice = (f"; `--half` exports them in float16 ({gb(values * 2)})" if not half and values * 2 < ONNX_FILE_LIMIT
              else "")
    raise ExportCheckError(f"{backbone.name}: its {values / 1e6:.0f} M weights are {gb(size)} in "
                           f"{'float16' if half else 'float32'}, past the {gb(ONNX_FILE_LIMIT)} one ONNX file holds "
                           f"(protobuf's limit; featx writes no external data){advice}")


def _export_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, outputs: list[str], *, opset: int,
                    name: str) -> None:
    """``model`` to ONNX at ``path``, its batch dimension dynamic. The TorchScript exporter first: it
    exports every torchvision model and nearly every timm one, quickly. A model it has no translation
    for (timm's HaloNet: Unfold of a size it cannot read; VOLO: col2im) goes through torch.export
    (the "dynamo" exporter, with onnxscript) at opset 18 or later, the weights kept inside the file."""
    import torch

    names = {"input_names": [INPUT_NAME], "output_names": outputs}
    with tempfile.TemporaryFile() as printed:
        try:
            with _output_into(printed):
                torch.onnx.export(model, (example,), str(path), **names, opset_version=opset, dynamo=False,
                                  dynamic_axes={output: {0: "batch"} for output in [INPUT_NAME, *outputs]})
        except torch.onnx.errors.OnnxExporterError as e:
            # what was printed is torch's whole TorchScript graph, to stdout (3,700 lines for MobileNetV5), on
            # a failure whatever `verbose` says (setup_onnx_logging tests the function _jit_is_onnx_log_enabled,
            # not what it returns): left unsaid
            _logger.info("%s: the TorchScript exporter cannot export it (%s): exporting through torch.export",
                         name, first_line(e))
        else:
            printed.seek(0)
            sys.stderr.write(printed.read().decode(errors="replace"))
            return
    path.unlink(missing_ok=True)
    # onnxscript's optimiser logs each initializer it merges (86 lines for HaloNet) at INFO
    chatty = [logging.getLogger(library) for library in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in chatty]
    try:
        for logger in chatty:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        torch.onnx.export(model, (example,), str(path), **names, opset_version=max(opset, 18), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                          verbose=False)
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _output_into(file):
    """File descriptors 1 and 2 (what C++ code such as torch's ONNX log writes to, and Python's
    sys.stdout and sys.stderr) into ``file`` while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(file.fileno(), 1)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, kept in zip((1, 2), saved):
            os.dup2(kept, fd)
            os.close(kept)


def compare_with_torch(path: str | os.PathLike, backbone: Backbone, *, half: bool = False) -> float:
    """Largest |onnxruntime - torch fp32| over real photos, relative to the largest |embedding|.

    Raises ExportCheckError above the tolerance for the precision.
    """
    import torch

    from .runtime import load_model

    images = check_images(backbone.preprocess)
    reference = embedding_model(backbone, fixed_padding=False)
    with torch.no_grad():
        ref = reference(torch.from_numpy(images))
    ref_emb = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    got = load_model(path, device="cpu").encode(images)
    scale = float(np.abs(ref_emb).max()) or 1.0
    worst = float(np.abs(got.embedding - ref_emb).max()) / scale
    cosine = cosine_agreement(got.embedding, ref_emb)
    tolerance = TOLERANCE["fp16" if half else "fp32"]
    if not half and tolerance < worst <= FP32_NEAR[0] and cosine >= FP32_NEAR[1]:
        tolerance = FP32_NEAR[0]
    _logger.info(
        "export check on %d photos: max |onnx - torch| = %.2e of the embedding scale (tolerance %.0e, %s), "
        "cosine %.7f at the least", len(images), worst, tolerance, "fp16" if half else "fp32", cosine,
    )
    if not worst <= tolerance:
        own = _torch_own_spread(reference, images, ref_emb)
        if own > max(tolerance, FP32_NEAR[0]) and worst <= 2 * own:  # torch itself is further off than allowed
            _logger.warning(
                "%s: torch's own embeddings of the check photos differ by %.3g of the embedding scale between "
                "batches of 1 and of %d (they reach %.3g with these weights: rounding grows through its "
                "layers), so the export's %.3g cannot be told from rounding: not refused, not checked",
                backbone.name, own, len(images), scale, worst)
            return worst
        near = "" if half else f", or {FP32_NEAR[0]:g} where every cosine is {FP32_NEAR[1]:g} or more"
        raise ExportCheckError(
            f"{path}: onnxruntime and torch embeddings differ by {worst:.3g} of the embedding scale (cosine "
            f"{cosine:.5f} at the least), tolerance {tolerance:g}{near}"
        )
    return worst


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two embedding matrices (0 for a zero row)."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def _torch_own_spread(model, images: np.ndarray, batched: np.ndarray) -> float:
    """Largest |torch's embedding of each image alone - in the batch| as a fraction of the largest
    |embedding|: how far rounding alone moves torch's own output. Near 1e-7 for a trained model; with seeded
    random weights some nets' activations grow layer after layer (timm's EfficientNetV2-rw-t: 5e5 at
    the last block, cosine 0.73 between batch sizes) and no file could match torch closer than torch does."""
    import torch

    with torch.no_grad():
        alone = [model(torch.from_numpy(images[i:i + 1])) for i in range(len(images))]
    alone = np.concatenate([(out[0] if isinstance(out, tuple) else out).numpy() for out in alone])
    return float(np.abs(alone - batched).max()) / (float(np.abs(batched).max()) or 1.0)


def default_models_dir() -> Path:
    """Where exported files go unless told: ``$FEATX_MODELS``; else the ``models/`` folder of the featx clone
    this runs from (``pip install -e .``, as the README installs it), whichever folder it is run in; else,
    installed elsewhere, ``models/`` in featx's user cache folder (``~/.cache/featx``). A ``models/`` made
    in the current folder put a 14 MB file and a folder into a photo folder embedded from inside it."""
    if os.environ.get("FEATX_MODELS"):
        return Path(os.environ["FEATX_MODELS"])
    clone = Path(__file__).resolve().parent.parent
    if (clone / "pyproject.toml").is_file() and (clone / "models").is_dir():
        return clone / "models"
    from .calibration import featx_cache_dir

    return featx_cache_dir() / "models"


def is_model_file(model: str | os.PathLike) -> bool:
    """Whether ``model`` names an exported file (a .onnx path, or any existing file: a model renamed or
    downloaded without its suffix) rather than a backbone name."""
    path = Path(model)
    return path.suffix == ".onnx" or path.is_file()


def ensure_model_file(
    model: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    half: bool = False,
    models_dir: str | os.PathLike | None = None,
) -> Path:
    """An exported ONNX file for ``model``: the file itself if ``model`` is a path, else the backbone
    name exported into ``models_dir`` on first use (``NAME[-fp16][-WEIGHTS].onnx``) and reused after.
    A file there that an earlier featx wrote with per-call 'SAME' padding, or one damaged since (cut
    short by a copy or a full disk, or bytes of its weights changed), is exported again
    (:func:`refresh_models_folder_file`).
    """
    if is_model_file(model):
        _say_if_outdated(Path(model))
        return Path(model)
    from .backbones import load_backbone

    name = str(model)
    path = model_path(name, weights=weights, half=half, models_dir=models_dir)
    if not path.is_file():
        backbone = load_backbone(name, weights=weights)  # an unknown name fails here, before any "exporting"
        try:
            check_writable_folder(path.parent, path, create=True)
        except FeatxError as e:
            raise FeatxError(f"{e}; set FEATX_MODELS to a folder featx can write, or give an exported .onnx "
                             "file as the model") from None
        _logger.info("exporting %s to %s (first use)", name, path)
        export_onnx(backbone, path, half=half)
    else:
        refresh_models_folder_file(path, name, weights=weights, half=half)
    return path


# files given by path that _say_if_outdated has read (runtime._checked_key): once a process
_OUTDATED_SAID: set[tuple[str, int, int, int]] = set()


def _say_if_outdated(path: Path) -> None:
    """Warn, once a process, when a file given by path is an earlier featx's export of another model than its
    weights are (:func:`outdated_export`), and say when it is one that pads per call, slower than today's export
    of the same model. featx replaces such files in its models folder itself; a user's own file is theirs, and
    the caches and heads made with it keep to it, so it is used, and said."""
    from .runtime import _checked_key, read_model_info

    try:
        key = _checked_key(path)
    except OSError:
        return  # loading it says what is wrong
    if key in _OUTDATED_SAID:
        return
    _OUTDATED_SAID.add(key)

    try:
        info = read_model_info(path)
    except (FeatxError, OSError):
        return  # not featx's, or damaged: loading it says so
    outdated = outdated_export(info)
    if outdated is not None:
        _logger.warning("%s: %s (an earlier featx's export); %s exports the model its weights are, under another "
                        "fingerprint (embed into a new cache with it)", path, outdated, export_again_command(info))
    elif info.pads_per_call:
        _logger.info("%s works its 'SAME' padding out at every call (an earlier featx's export): %s gives the same "
                     "embeddings under the same fingerprint at 1.5-1.9x the speed on a CPU", path,
                     export_again_command(info))


def export_again_command(info: ModelInfo) -> str:
    """The command that writes an earlier featx's file again as today's featx exports it: a merged classifier's
    with its head (`featx export` would drop the head), any other with the weights it was made from."""
    if info.class_scores == "probabilities":
        return "`featx export-classifier` with the head it was made from"
    return f"`featx export {info.backbone} -o NEW.onnx` with the weights it was made from"


def refresh_models_folder_file(path: Path, name: str, *, weights=None, half: bool = False) -> bool:
    """Export ``name`` again over the models folder's ``path`` when that file pads per call, so an earlier
    featx's export gets the fixed padding (1.5-1.7x on a CPU) without the user deleting it. The new file
    replaces the old only with the same fingerprint (weights, preprocessing, precision), so the caches
    and heads made with the old one still take it; otherwise, or when the export cannot be made here
    (the weights' download offline), the old file is kept and used. A file that is no ONNX model at all
    (featx writes by rename, so a copy or a sync cut it short) is replaced whatever the new one's
    fingerprint; when that export fails, the refusal says to delete it. Returns whether it was replaced."""
    from .backbones import load_backbone
    from .runtime import read_model_info

    try:
        old = read_model_info(path)
    except ModelFileError as e:
        damage = _damage_of(path)
        if damage is None:
            return False  # a model, not featx's: loading it names what is wrong
        return _export_over_damaged(path, name, damage, refused=e, weights=weights, half=half)
    outdated = outdated_export(old, name)
    if outdated is not None:
        return _export_over_outdated(path, name, old, outdated, weights=weights, half=half)
    if not old.crop_mode_said:  # said once (the same fingerprint), it is not looked up again
        with contextlib.suppress(OSError):  # a folder shared read-only: looked up at every run
            _rewrite_crop_mode(path, old.preprocess.crop_mode)
    if not old.pads_per_call:
        return False
    fresh = path.with_name(f".{path.stem}.refresh.onnx")
    try:
        _logger.info("exporting %s to %s again: the file an earlier featx wrote works its padding out at every "
                     "call (the same embeddings, faster)", name, path)
        new = export_onnx(load_backbone(name, weights=weights), fresh, half=half).fingerprint
        if new != old.fingerprint:
            _logger.warning("%s kept as it is: exported again, %s's fingerprint is %s, not the file's %s (other "
                            "weights?)", path, name, new, old.fingerprint)
            return False
        replace_model_file(fresh, path)
        return True
    except Exception as e:  # the old file still works: a failed refresh must not stop the run
        _logger.warning("%s kept as it is (per-call padding): exporting %s again failed: %s", path, name,
                        first_line(e))
        return False
    finally:
        fresh.unlink(missing_ok=True)


def outdated_export(info: ModelInfo, name: str | None = None) -> str | None:
    """Why an earlier featx's export of a backbone is not the model its weights are, or None: torchvision's
    Inception v3 or GoogLeNet without the input scaling its weights expect (:attr:`ModelInfo.unscaled_input`),
    or a timm model centre-cropped where timm evaluates its weights with another crop mode (before
    2026-12-07 both). A fine-tuned export or a merged head learnt on the file's own embeddings: None.
    ``name``: the backbone name the file was asked for (timm/efficientnet_b5, whose file says efficientnet_b5,
    which is torchvision's too)."""
    from .backbones import timm_crop_mode

    if info.trained_phashes is not None or info.class_scores != "logits":
        return None
    if info.unscaled_input:
        return ("it does not scale its input as its weights expect (torchvision's transform_input), so its embeddings "
                "and classes are another model's")
    # (timm's table needs torch and timm imported, 2-3 s: looked up only for a file that does not say its mode)
    mode = None if info.crop_mode_said else timm_crop_mode(name or info.backbone)
    if mode not in (None, "center"):
        return (f"it centre-crops photos, where timm evaluates {name or info.backbone}'s weights with its {mode!r} "
                "crop mode (the whole photo), so its embeddings are of a part of each photo")
    return None


def _export_over_outdated(path: Path, name: str, old: ModelInfo, outdated: str, *, weights, half: bool) -> bool:
    """Replace an earlier featx's export that :func:`outdated_export` finds is not the model its weights are,
    whatever the new file's fingerprint: exported again (Inception v3, GoogLeNet), or, where only the crop
    mode its metadata says was wrong, that metadata rewritten (the graph is the model's; no download). Where
    the export cannot be made (offline), the old file is used."""
    from .backbones import load_backbone, timm_crop_mode

    done = "exported again" if old.unscaled_input else "its crop mode written into it"
    try:
        if old.unscaled_input:
            new = export_onnx(load_backbone(name, weights=weights), path, half=half).fingerprint
        else:
            new = _rewrite_crop_mode(path, timm_crop_mode(name))
    except Exception as e:
        _logger.warning("%s kept as it is, though %s (an earlier featx's export): %s failed: %s", path, outdated,
                        "exporting it again" if old.unscaled_input else "rewriting it", first_line(e))
        return False
    _logger.warning("%s %s: %s (an earlier featx's export); what caches and heads hold of it (fingerprint %s) stays "
                    "apart from this one's (%s)", path, done, outdated, old.fingerprint, new)
    return True


def _rewrite_crop_mode(path: Path, crop_mode: str) -> str:
    """``path`` with ``crop_mode`` in its preprocessing metadata, written by rename; its new fingerprint."""
    import onnx

    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(entry.value)
    meta["preprocess"]["crop_mode"] = crop_mode
    info = ModelInfo.from_json(json.dumps(meta))
    if "input" in meta:  # the words for whoever runs the file without featx
        meta["input"] = info.input_description()
    entry.value = json.dumps(meta)
    fresh = _partial_name(path)
    try:
        save_model_file(proto, fresh)
        replace_model_file(fresh, path)
    finally:
        fresh.unlink(missing_ok=True)
    return info.fingerprint


def _partial_name(path: Path) -> Path:
    """A hidden name beside ``path`` of this write's own (two runs may write one model at once)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def _damage_of(path: Path) -> str | None:
    """Why the file is no ONNX model (protobuf cannot parse it, or it holds no graph) or its weights are
    damaged, or None."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        return first_line(e)
    return weights_damage(proto) if proto.graph.node else "it holds no graph (an empty or cut-short file)"


def _export_over_damaged(path: Path, name: str, damage: str, *, refused: Exception, weights, half: bool) -> bool:
    from .backbones import load_backbone

    _logger.warning("%s is damaged (%s): exporting %s again", path, damage, name)
    try:  # export_onnx writes a file of its own and renames it over path only when it is whole and checked
        export_onnx(load_backbone(name, weights=weights), path, half=half)
        return True
    except Exception as e:
        raise ModelFileError(f"{refused}; exporting {name} again failed ({first_line(e)}): delete {path} and featx "
                             "exports it on its next run that can") from None


def model_path(name: str, *, weights: str | os.PathLike | None = None, half: bool = False,
               models_dir: str | os.PathLike | None = None) -> Path:
    """Where a backbone name's export lives: ``models_dir/NAME[-fp16][-WEIGHTS].onnx``."""
    tag = "" if weights is None else "-" + _weights_tag(str(weights))
    return Path(models_dir or default_models_dir()) / f"{name.replace('/', '_')}{'-fp16' if half else ''}{tag}.onnx"


def _weights_tag(weights: str) -> str:
    import hashlib

    if weights in ("none", "pretrained", "bundled"):
        return weights
    # path, size and mtime: a checkpoint rewritten by a later fine-tuning run gets a new export
    st = os.stat(weights) if os.path.exists(weights) else None
    ident = f"{os.path.abspath(weights)}|{st.st_size if st else ''}|{st.st_mtime_ns if st else ''}"
    return Path(weights).stem[:24] + "-" + hashlib.sha256(ident.encode()).hexdigest()[:8]
