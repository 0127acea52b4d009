"""Back to torch when frozen features + a head are not enough: unfreeze the top blocks, train, re-export.

Blocks are the architecture's own units (ResNet stages, EfficientNet/MobileNet blocks, VGG conv
blocks, DenseNet dense blocks, timm's block lists), not a count of parameters. BatchNorm layers in
frozen blocks stay in eval mode. The backbone trains at a tenth of the new head's learning rate.
Checkpoints are .safetensors (tensors only) with a JSON header; ``featx export NAME --weights CKPT``
turns one into an ONNX file whose logits are the new classes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .backbones import DEFAULT_BACKBONE, save_safetensors, tensors_sha256
from .errors import FeatxError, check_output_file

_logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "featx-finetune/1"


def model_blocks(features) -> list[tuple[str, object]]:
    """The backbone's blocks in forward order, as (name, module); only blocks that hold parameters.

    The blocks are the children of the backbone's trunk: the one Sequential/ModuleList of three or
    more parameterised children (timm's ``blocks``, torchvision's ``features``, a ViT's
    ``encoder.layers``), looked for inside a child that holds most of the weights too; with no single
    trunk (ResNet's four stages) the top-level children are the blocks. VGG's trunk of plain layers is
    cut into conv blocks at its max-pooling layers. A normalisation layer joins the block before it
    (``conv_head+bn2``): alone it would adapt no features, and ``--unfreeze 1`` would train a BatchNorm.
    """
    import torch

    containers = (torch.nn.Sequential, torch.nn.ModuleList)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)  # timm's subclass them

    def size(m) -> int:
        return sum(p.numel() for p in m.parameters())

    def weighted_children(prefix: str, m) -> list[tuple[str, object]]:
        return [(f"{prefix}{n}", c) for n, c in m.named_children() if size(c)]

    def trunk(m):
        stacks = [c for _, c in weighted_children("", m)
                  if isinstance(c, containers) and len(weighted_children("", c)) >= 3]
        return stacks[0] if len(stacks) == 1 else None

    def blocks_of(prefix: str, m) -> list[tuple[str, object]]:
        stack, out = trunk(m), []
        for name, child in weighted_children(prefix, m):
            if child is stack and all(not list(c.children()) for c in child.children()) and any(
                    isinstance(c, torch.nn.MaxPool2d) for c in child.children()):
                group: list = []  # VGG: plain layers, conv blocks end at max-pooling
                for n, c in child.named_children():
                    group.append(c)
                    if isinstance(c, torch.nn.MaxPool2d):
                        out.append((f"{name}[..{n}]", torch.nn.Sequential(*group)))
                        group = []
                if any(size(c) for c in group):
                    out.append((f"{name}[rest]", torch.nn.Sequential(*group)))
            elif child is stack:
                out += weighted_children(f"{name}.", child)
            elif stack is None and not isinstance(child, containers) and 2 * size(child) > size(m) and trunk(child):
                out += blocks_of(f"{name}.", child)  # the trunk sits one level down (a ViT's encoder.layers)
            else:
                out.append((name, child))
        return out

    merged: list[tuple[str, object]] = []
    for name, block in blocks_of("", features):
        if merged and isinstance(block, norms):
            before, module = merged[-1]
            merged[-1] = (f"{before}+{name.rsplit('.', 1)[-1]}", torch.nn.ModuleList([module, block]))
        else:
            merged.append((name, block))
    return merged


def freeze_except_top(features, unfreeze: int | str) -> tuple[list[str], list[str]]:
    """Freeze every block but the top ``unfreeze`` (or none, with "all"). Returns (frozen, trainable) names."""
    blocks = model_blocks(features)
    n = len(blocks) if unfreeze == "all" else int(unfreeze)
    if not 0 <= n <= len(blocks):
        raise FeatxError(f"--unfreeze {unfreeze}: this backbone has {len(blocks)} blocks "
                         f"({', '.join(name for name, _ in blocks)}); take 0 to {len(blocks)} or all")
    # "all" is the whole backbone: weights that sit outside every block (a ViT's class token) train too
    features.requires_grad_(n == len(blocks))
    for _, block in blocks[len(blocks) - n:]:
        block.requires_grad_(True)
    return [b for b, _ in blocks[: len(blocks) - n]], [b for b, _ in blocks[len(blocks) - n:]]


def set_train_mode(features, head) -> None:
    """Train mode for what trains; frozen modules (BatchNorm statistics included) stay in eval mode."""
    features.train()
    head.train()
    for module in features.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


def loss_text(value: float) -> str:
    """A loss as Keras prints it: 4 decimals, or 4 significant digits under 0.001 (1.3178e-05), so that
    epochs whose losses near zero differ are not each shown as 0.0000 beside the one that was kept."""
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.4e}"


@dataclass
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float

    def line(self, epochs: int) -> str:
        return (f"Epoch {self.epoch}/{epochs} - {self.seconds:.0f}s - loss: {loss_text(self.loss)}"
                f" - accuracy: {self.accuracy:.4f} - val_loss: {loss_text(self.val_loss)}"
                f" - val_accuracy: {self.val_accuracy:.4f}")


@dataclass
class FinetuneResult:
    checkpoint: str
    class_names: list[str]
    best_val_accuracy: float
    best_val_loss: float
    backbone: str = DEFAULT_BACKBONE  # the name its export takes (featx export NAME --weights CHECKPOINT)
    history: list[EpochLog] = field(default_factory=list)  # every epoch, those before a resume included
    frozen: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    curves: str = ""  # PNG of loss and accuracy per epoch, redrawn after each epoch
    skipped: dict[str, str] = field(default_factory=dict)  # files that could not be decoded -> why
    n_copies: int = 0  # files left out: the same bytes and class as another file of the folder
    n_near_copies: int = 0  # files in a group of near copies (perceptual hash), each group on one side of the split
    n_train: int = 0  # files in the training split (the folder's images, as embed walks it, less copies)
    n_val: int = 0  # and in the validation split
    val_files: list[str] = field(default_factory=list)  # the validation split's files; the others trained

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights the checkpoint holds: the lowest val_loss (not the best val_accuracy)."""
        return lowest_val_loss_epoch(self.history) if self.history else 0


def lowest_val_loss_epoch(history: Sequence[EpochLog]) -> int:
    """The epoch a run keeps (the first of the lowest val_loss), as the checkpoint is written."""
    return min(history, key=lambda e: e.val_loss).epoch


def without_copies(samples: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], int]:
    """(path, class) samples less those with the bytes and class of an earlier one, and how many went:
    a copy adds no information, and one on each side of a split scores what it trained on."""
    from .data import digests_of_look_alikes
    from .store import find_copies

    paths = [path for path, _ in samples]
    copies = find_copies(paths, [target for _, target in samples], digests_of_look_alikes(paths))
    return [samples[i] for i in copies.keep], copies.n_copies


def split_indices(targets: Sequence, val_fraction: float, seed: int, *, groups: np.ndarray | None = None,
                  where=None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation split of a folder's samples (the same one heads use); each
    group of ``groups`` (near copies) on one side. ``where``: the folder, named in a refusal."""
    from .heads import stratified_split

    try:
        return stratified_split(targets, val_fraction, seed, groups=groups, held_out="validation",
                                option="--val-fraction")
    except FeatxError as e:
        raise FeatxError(f"{where}: {e}" if where is not None else str(e)) from None


def head_from_file(path: str | os.PathLike, embed_dim: int, class_names: list[str]):
    """A torch classifier equal to a trained featx head (standardisation folded into the first layer)."""
    import torch

    from .heads import load_head

    head = load_head(path).head
    theirs = [str(c) for c in head.classes_]
    if theirs != class_names:
        def named(names: list[str]) -> str:
            return ", ".join(names[:10]) + (f" … ({len(names)} in all)" if len(names) > 10 else "")

        raise FeatxError(f"head {path} was trained on the classes {named(theirs)}; the folder's are "
                         f"{named(class_names)}: give a head trained on this folder's cache, or no --head")
    layers, modules = head.layers_, []
    for i, (W, b) in enumerate(layers):
        W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if i == 0:
            W, b = W / head.scale_, b - (W / head.scale_) @ head.mean_
        linear = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b))
        modules.append(linear)
        if i < len(layers) - 1:
            modules += [torch.nn.ReLU(), torch.nn.Dropout(getattr(head, "dropout", 0.5))]
    if modules[0].in_features != embed_dim:
        raise FeatxError(f"head {path} takes {modules[0].in_features}-d embeddings, the backbone gives {embed_dim}")
    return torch.nn.Sequential(*modules)


def fine_tune(
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    head: str | os.PathLike | None = None,
    unfreeze: int | str = 2,
    epochs: int = 10,
    lr: float = 1e-3,
    backbone_lr_scale: float = 0.1,
    batch_size: int = 32,
    input_size: int | None = None,
    val_fraction: float = 0.2,
    hflip: bool = True,
    vflip: bool = False,
    patience: int = 3,
    seed: int = 0,
    workers: int = 0,
    device: str = "auto",
    resume: bool = False,
    log=print,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` on the class folders under ``root``; the best epoch (lowest val_loss) is saved.

    Args:
        head: a trained featx head (.safetensors) to start the new classifier from (the linear probe).
        unfreeze: how many top blocks train, "all", or "auto" (what :func:`advise` recommends).
        input_size: train and validate at this size instead of the model's (small images train faster).
        resume: continue from ``output`` if it exists (weights and epoch count).
        progress: progress bars while the folder is hashed for near copies (decoded once before training)
            and through each epoch (an epoch of a few thousand photos takes minutes on a CPU).
    """
    import torch
    from torchvision import transforms as T

    from .data import FileEntry, class_names_of, decode_floor, folder_to_walk, walk_images
    from .heads import near_copy_split_groups
    from .pipeline import _progress_bar, perceptual_hashes_of_files
    from .runtime import resolve_device, torch_backbone

    check_output_file(output, example="finetuned.safetensors")
    torch.manual_seed(seed)
    device = resolve_device(device)
    # the files embed reads, through its walk (not torchvision's ImageFolder, which followed a symlink
    # loop until the OS refused and took Synology's @eaDir thumbnails as more photos of a class)
    class_names = class_names_of(folder_to_walk(root))
    entries = [e for e in walk_images(root) if isinstance(e, FileEntry) and e.label is not None]
    empty = sorted(set(class_names) - {e.label for e in entries}, key=os.fsencode)
    if not class_names or empty:
        raise FeatxError(f"{root}: fine-tuning needs images in class subfolders"
                         + (f"; none in {', '.join(empty)}" if empty else ""))
    index = {name: i for i, name in enumerate(class_names)}
    samples, n_copies = without_copies([(e.path, index[e.label]) for e in entries])
    if n_copies:
        log(f"{n_copies} cop{'ies' if n_copies > 1 else 'y'} of other images left out (same bytes and class): "
            "one on each side of the split would be validated on what it trained on")
    # before the backbone loads: a folder that cannot be split is reported at once
    targets = [class_names[t] for _, t in samples]
    train_idx, val_idx = split_indices(targets, val_fraction, seed, where=root)
    backbone = torch_backbone(model, weights)
    p = backbone.preprocess
    size = input_size or p.input_size[0]
    resize = int(round(size * p.resize_size / p.input_size[0]))
    # the same picture resized or re-encoded (a photo and its export, a NAS thumbnail kept as a photo) has
    # other bytes: each picture's copies go to one side of the split, or the best epoch is chosen on
    # pictures that trained. Hashed at the size the export will run at, as evaluate hashes a test folder
    # to leave out the pictures this model trained on (the checkpoint keeps the hashes).
    output = Path(output)
    checkpoint = _read_checkpoint(output) if resume and output.is_file() else None
    if resume and checkpoint is None:  # a name mistyped would otherwise retrain from scratch unsaid
        log(f"nothing to resume: {output} does not exist yet; training from epoch 1")
    folder_identity = _folder_identity(entries, size, resize)
    if checkpoint is not None and checkpoint[1].get("folder_identity") == folder_identity:
        # the same files, unchanged (size, mtime), hashed at the same size: the first run's hashes hold
        phashes = checkpoint[0][_SAMPLE_PHASHES].numpy().view(np.uint64)
        log(f"perceptual hashes of {len(phashes)} images from {output} (the folder is unchanged since)")
    else:
        phashes = perceptual_hashes_of_files([path for path, _ in samples],
                                             replace(p, input_size=(size, size), resize_size=resize), progress=progress)
    groups, n_near = near_copy_split_groups(phashes, root, say=log)
    if groups is not None:
        train_idx, val_idx = split_indices(targets, val_fraction, seed, groups=groups, where=root)
    features = backbone.features
    if unfreeze == "auto":
        unfreeze = advise(root, model=model, weights=weights, device=device).unfreeze
        log(f"advise: unfreeze {unfreeze}")
    frozen, trainable = freeze_except_top(features, unfreeze)
    classifier = (head_from_file(head, backbone.embed_dim, class_names) if head
                  else torch.nn.Linear(backbone.embed_dim, len(class_names)))
    start_epoch, best, history = 0, (np.inf, 0.0), []
    if checkpoint is not None:
        state, meta = checkpoint
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        classifier = _classifier_from_state(state, meta)
        start_epoch, best = int(meta["epoch"]), (float(meta["val_loss"]), float(meta["val_accuracy"]))
        history = [EpochLog(**e) for e in meta.get("history", [])]
        log(f"resuming from {output} after epoch {start_epoch}")

    interp = getattr(T.InterpolationMode, p.interpolation.upper())
    normalise = [T.ToTensor(), T.Normalize(p.mean, p.std)]
    train_tf = T.Compose([
        T.RandomResizedCrop(size, scale=(0.7, 1.0), interpolation=interp),
        *([T.RandomHorizontalFlip()] if hflip else []), *([T.RandomVerticalFlip()] if vflip else []),
        T.RandomAffine(degrees=0, shear=10),
        T.Lambda(lambda im: im.convert("RGB")), *normalise,
    ])
    val_tf = T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size),
                        T.Lambda(lambda im: im.convert("RGB")), *normalise])
    # 12-megapixel JPEGs decode 3.7x as fast at reduced scale (python benchmarks/large_photos.py: 24.3
    # against 6.6 photos/s), whose crops still hold three times the pixels they are resized to (decode_floor)
    floor = decode_floor(replace(p, input_size=(size, size), resize_size=resize))
    train_set = _FolderImages([samples[i] for i in train_idx], train_tf, floor)
    val_set = _FolderImages([samples[i] for i in val_idx], val_tf, floor)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=_collate_decoded)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size * 2, num_workers=workers,
                                             collate_fn=_collate_decoded)

    features.to(device)
    classifier.to(device)
    params = [{"params": [q for q in features.parameters() if q.requires_grad], "lr": lr * backbone_lr_scale},
              {"params": list(classifier.parameters()), "lr": lr}]
    optimizer = torch.optim.AdamW([g for g in params if g["params"]], weight_decay=1e-4)
    # cosine decay over the planned epochs: large steps first, settling at the end
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), last_epoch=-1)
    with warnings.catch_warnings():  # a resume moves the schedule on before any optimizer step, on purpose
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(start_epoch):
            schedule.step()
    loss_fn = torch.nn.CrossEntropyLoss()
    use_amp = device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    result = FinetuneResult(str(output), class_names, best[1], best[0], backbone=backbone.name, history=history,
                            frozen=frozen,
                            trainable=trainable, curves=str(output.with_suffix(".curves.png")), n_copies=n_copies,
                            n_near_copies=n_near, n_train=len(train_idx), n_val=len(val_idx),
                            val_files=[samples[i][0] for i in val_idx])
    skipped = result.skipped
    waited = 0
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        set_train_mode(features, classifier)
        total, correct, loss_sum = 0, 0, 0.0
        # training then validation images; cleared when the epoch's line is printed
        bar = _progress_bar(len(train_set) + len(val_set), progress, desc=f"epoch {epoch}/{epochs}", leave=False)
        for x, y, bad in loader:
            skipped.update(bad)
            bar.update(len(bad) + (0 if x is None else len(y)))
            if x is None:
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, enabled=use_amp):
                logits = classifier(features(x))
                loss = loss_fn(logits, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        if not total:
            raise FeatxError("no training image could be decoded")
        schedule.step()
        val_loss, val_acc = evaluate(features, classifier, val_loader, device, skipped=skipped, on_batch=bar.update)
        bar.close()
        if epoch == start_epoch + 1 and skipped:
            log(f"skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that cannot be decoded, e.g. {next(iter(skipped))}: "
                f"{next(iter(skipped.values()))}")
        entry = EpochLog(epoch, loss_sum / total, correct / total, val_loss, val_acc, time.perf_counter() - t0)
        result.history.append(entry)
        log(entry.line(epochs))
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_val_accuracy, waited = val_loss, val_acc, 0
            # the history up to this epoch goes with the weights: a resume continues from here
            _write_checkpoint(output, features, classifier, model=backbone.name, class_names=class_names,
                              input_size=[size, size], resize_size=resize,
                              trained_phashes=phashes, folder_identity=folder_identity,
                              epoch=epoch, val_loss=val_loss, val_accuracy=val_acc,
                              trained_blocks=trainable,
                              history=[asdict(e) for e in result.history])
        else:
            waited += 1
        plot_curves(result.history, Path(result.curves),
                    title=f"{backbone.name} fine-tuned: {', '.join(trainable) or 'classifier only'}")
        if waited >= patience:
            log(f"early stopping: val_loss has not improved for {patience} epochs")
            break
    if output.is_file():
        # the kept epoch's embeddings of its training images, each class's mean direction: its export marks
        # an image unlike them, as a head's predict does (a Ctrl-C here leaves the checkpoint as it was)
        t0 = time.perf_counter()
        train_plain = _FolderImages([samples[i] for i in train_idx], val_tf, floor)
        _add_class_means(output, features, torch.utils.data.DataLoader(
            train_plain, batch_size=batch_size * 2, num_workers=workers, collate_fn=_collate_decoded), device,
            len(class_names), bar=_progress_bar(len(train_plain), progress, desc="class means", leave=False))
        log(f"class means of the {len(train_plain)} training images (its export marks images unlike them) in "
            f"{time.perf_counter() - t0:.1f} s")
    return result


def _add_class_means(path: Path, features, loader, device: str, n_classes: int, *, bar) -> None:
    """Embed ``loader``'s images with the checkpoint's own weights (those of the epoch it kept, not the
    last one's) and add each class's mean direction and the cosine to the nearest that 99% of them reach
    (:func:`featx.heads.class_means_and_typical_cosine`) to the checkpoint at ``path``."""
    import torch

    from .heads import class_means_and_typical_cosine

    state, meta = _read_checkpoint(path)
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    features.eval()
    embeddings, targets = [], []
    with torch.no_grad():
        for x, y, bad in loader:
            bar.update(len(bad) + (0 if x is None else len(y)))
            if x is not None:
                embeddings.append(features(x.to(device)).float().cpu().numpy())
                targets.append(y.numpy())
    bar.close()
    if not embeddings:
        return
    means, typical = class_means_and_typical_cosine(np.concatenate(embeddings), np.concatenate(targets), n_classes)
    if typical is None:
        return
    state[_CLASS_MEANS] = torch.from_numpy(means.astype(np.float32))
    save_safetensors(state, path, {**meta, "typical_cosine": typical})


def plot_curves(history: Sequence[EpochLog], path: Path, *, title: str) -> None:
    """Loss and accuracy per epoch, training and validation, the best epoch (lowest val_loss) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [e.epoch for e in history]
    best = lowest_val_loss_epoch(history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [getattr(e, name) for e in history], "o-", label=f"training {name}")
        ax.plot(epochs, [getattr(e, f"val_{name}") for e in history], "o-", label=f"validation {name}")
        ax.axvline(best, color="grey", linestyle="--", label=f"best epoch ({best}, saved)")
        ax.set_xlabel("epoch")
        # whole epochs only: one epoch alone was drawn on ticks 0.945 … 1.050
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _FolderImages:
    """(path, class index) samples as a torch dataset, decoded as embed decodes them (EXIF, CMYK,
    16-bit, HEIC ...). A file that cannot be decoded is an item of its own, (None, target,
    (path, reason)), that the collate function leaves out of the batch: a corrupt photo in a class
    folder costs one image, not the training run."""

    def __init__(self, samples: list[tuple[str, int]], transform, min_size: int):
        self.samples = samples
        self.transform = transform
        self.min_size = min_size  # a large JPEG decoded at reduced scale, as embed decodes it

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from .data import decode_image, failure_reason

        path, target = self.samples[i]
        try:
            return self.transform(decode_image(path, min_size=self.min_size)), target, None
        except Exception as e:
            return None, target, (path, failure_reason(e))


def _collate_decoded(items):
    """Batch of (image, target, failure) -> (images or None when none decoded, targets, {path: reason})."""
    import torch

    good = [(x, y) for x, y, bad in items if bad is None]
    failed = dict(bad for _, _, bad in items if bad is not None)
    if not good:
        return None, None, failed
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), failed


def evaluate(features, classifier, loader, device: str, skipped: dict | None = None,
             on_batch=None) -> tuple[float, float]:
    """(mean loss, accuracy) over ``loader``; ``on_batch(n)`` after each batch of n images (decoded or not)."""
    import torch

    features.eval()
    classifier.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y, bad in loader:
            if skipped is not None:
                skipped.update(bad)
            if on_batch is not None:
                on_batch(len(bad) + (0 if x is None else len(y)))
            if x is None:
                continue
            x, y = x.to(device), y.to(device)
            logits = classifier(features(x)).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    if not total:
        raise FeatxError("no validation image could be decoded")
    return loss_sum / total, correct / total


def _write_checkpoint(path: Path, features, classifier, *, trained_phashes: np.ndarray, **meta) -> None:
    """``trained_phashes``: uint64 perceptual hashes of the folder's images in sample order (0: not
    decoded), kept so that the export can tell evaluate which pictures it must not be scored on (the
    distinct ones), and so that a resume on the unchanged folder (``meta["folder_identity"]``) splits
    it as the first run did without decoding it again (all of them)."""
    import torch

    state = {f"features.{k}": v.detach().cpu().contiguous() for k, v in features.state_dict().items()}
    state.update({f"classifier.{k}": v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()})
    known = np.unique(trained_phashes[trained_phashes != 0])
    state[_TRAINED_PHASHES] = torch.from_numpy(known.view(np.int64))  # safetensors' torch side has no uint64
    state[_SAMPLE_PHASHES] = torch.from_numpy(np.ascontiguousarray(trained_phashes, dtype=np.uint64).view(np.int64))
    save_safetensors(state, path, {"format": CHECKPOINT_FORMAT, **meta})


_TRAINED_PHASHES = "featx.trained_phashes"
_CLASS_MEANS = "featx.class_means"
_SAMPLE_PHASHES = "featx.sample_phashes"


def _folder_identity(entries, size: int, resize: int) -> str:
    """SHA-256 of the folder's labelled files as the walk found them (key, size, mtime, class) and of the
    size they are hashed at: equal on a resume when nothing changed."""
    import hashlib

    digest = hashlib.sha256(f"{size},{resize}".encode())
    for e in entries:
        digest.update(f"\n{e.key}\0{e.size}\0{e.mtime_ns}\0{e.label}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("featx", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FeatxError(f"{path}: not a featx fine-tuning checkpoint")
    if "tensors_sha256" in meta and meta["tensors_sha256"] != tensors_sha256(sorted(state.items())):
        raise FeatxError(f"{path}: its tensors are not those featx wrote (their SHA-256 differs: damaged on disk or "
                         "in a copy); fine-tune again")
    return state, meta


def _classifier_from_state(state: dict, meta: dict):
    """Rebuild the classifier (Linear, or the MLP a head started it as) from checkpoint tensors."""
    import torch

    keys = sorted({k.split(".")[1] for k in state if k.startswith("classifier.")} - {"weight", "bias"})
    if "classifier.weight" in state:
        w = state["classifier.weight"]
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": state["classifier.bias"]})
        return linear
    modules = []
    for i, idx in enumerate(sorted(int(k) for k in keys)):
        w, b = state[f"classifier.{idx}.weight"], state[f"classifier.{idx}.bias"]
        while len(modules) < idx:
            modules.append(torch.nn.ReLU() if len(modules) % 3 == 1 else torch.nn.Dropout(0.5))
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": b})
        modules.append(linear)
    return torch.nn.Sequential(*modules)


def describe_checkpoint(path: str | os.PathLike) -> tuple[str, bool]:
    """One line from a fine-tuning checkpoint's metadata: the model, its classes, the size it trained at,
    the blocks trained and its best epoch, and how to export it; and whether it records the digest of its
    tensors. They are read to check it (a FeatxError for a damaged file)."""
    meta = _read_checkpoint(Path(path))[1]
    classes = meta.get("class_names", [])
    blocks = meta.get("trained_blocks")
    return (f"fine-tuned {meta.get('model')} for {len(classes)} classes ({', '.join(map(str, classes))}), "
            + (f"input {'x'.join(map(str, meta['input_size']))}, " if "input_size" in meta else "")
            + (f"blocks trained: {', '.join(blocks) or 'classifier only'}, " if blocks is not None else "")
            + f"best at epoch {meta.get('epoch')} (val_accuracy {meta.get('val_accuracy', float('nan')):.4f}, "
            f"val_loss {loss_text(meta.get('val_loss', float('nan')))}); "
            + ("its training images' class means kept (its export marks images unlike them); "
               if "typical_cosine" in meta else "")
            + f"{export_command(path, meta)} makes it a model"), "tensors_sha256" in meta


def export_command(path: str | os.PathLike, meta: dict | None = None) -> str | None:
    """`featx export MODEL --weights PATH -o PATH.onnx`, the command that makes a fine-tuning checkpoint a
    model file beside it (without -o the export goes to the models folder, where --weights finds it);
    None when ``path`` is not one."""
    if meta is None:
        from .runtime import file_kind

        if file_kind(path) != "safetensors":  # told by its content: a checkpoint may have any name
            return None
        try:
            meta = _checkpoint_meta(path)
        except Exception:
            return None
    if meta.get("format") != CHECKPOINT_FORMAT:
        return None
    return f"`featx export {meta.get('model')} --weights {path} -o {Path(path).with_suffix('.onnx')}`"


def is_finetune_checkpoint(path: str | os.PathLike) -> bool:
    return export_command(path) is not None


def _checkpoint_meta(path: str | os.PathLike) -> dict:
    """A safetensors file's featx metadata (its header alone: no tensor is read); {} without any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("featx", "{}"))


def load_finetuned(backbone, path: str | os.PathLike):
    """Put a fine-tuning checkpoint's weights and classifier into ``backbone`` (built with random weights)."""
    from .backbones import apply_state_dict

    state, meta = _read_checkpoint(Path(path))
    # (timm/resnet50's checkpoints said resnet50 before 2026-12-07)
    if meta.get("model") not in (backbone.name, backbone.name.removeprefix("timm/")):
        raise FeatxError(f"{path} fine-tuned {meta.get('model')}, not {backbone.name}")
    apply_state_dict(backbone.features, {k[len("features."):]: v for k, v in state.items()
                                         if k.startswith("features.")}, source=str(path))
    backbone.classifier = _classifier_from_state(state, meta).eval().requires_grad_(False)
    backbone.class_names = list(meta["class_names"])
    if "input_size" in meta:  # trained at another size (--input-size): exported and run at that size too,
        # since a convnet tuned on 64-pixel digits does not recognise them at 224
        backbone.preprocess = replace(backbone.preprocess, input_size=tuple(meta["input_size"]),
                                      resize_size=int(meta["resize_size"]))
    if _TRAINED_PHASHES in state:
        backbone.trained_phashes = state[_TRAINED_PHASHES].numpy().view(np.uint64)
    if _CLASS_MEANS in state and isinstance(meta.get("typical_cosine"), (int, float)):
        backbone.class_means, backbone.typical_cosine = state[_CLASS_MEANS].numpy(), float(meta["typical_cosine"])
    backbone.weights = str(path)
    return backbone


# ---------------------------------------------------------------------------------------- the four cases


@dataclass
class Advice:
    """What ``advise`` measured and recommends."""

    n_images: int
    n_classes: int
    images_per_class: float
    imagenet_confidence: float  # mean top-1 ImageNet probability on a sample: high means ImageNet-like; nan: not measured
    probe_accuracy: float  # cross-validated logistic regression on frozen embeddings of the sample; nan: not run
    size: str  # "small" or "large"
    similarity: str  # "similar", "different", or "unknown" (a model without an ImageNet classifier)
    recommendation: str
    unfreeze: int | str
    probe_folds: int = 3
    probe_note: str = ""  # why the probe did not run
    skipped: dict[str, str] = field(default_factory=dict)  # sampled files that could not be decoded -> why
    n_copies: int = 0  # files not counted: the same bytes and class as another
    n_near_copies: int = 0  # sampled images with a near copy in the sample, each picture's in one of the probe's folds

    def text(self) -> str:
        kept = f", {self.n_near_copies} near copies, each picture's in one fold" if self.n_near_copies else ""
        probe = (f"({self.probe_folds}-fold CV on the sample{kept}): accuracy {self.probe_accuracy:.3f}"
                 if self.probe_accuracy == self.probe_accuracy else f": not run ({self.probe_note})")
        skipped = (f"\n{len(self.skipped)} sampled file{'s' if len(self.skipped) > 1 else ''} skipped (cannot be decoded), e.g. "
                   f"{next(iter(self.skipped))}: {next(iter(self.skipped.values()))}" if self.skipped else "")
        copies = (f", {self.n_copies} cop{'ies' if self.n_copies > 1 else 'y'} of other images left out"
                  if self.n_copies else "")
        return (f"{self.n_images} images in {self.n_classes} classes ({self.images_per_class:.0f} per class: {self.size})"
                f"{copies}\n"
                + (f"ImageNet classifier's mean top-1 confidence on a sample: {self.imagenet_confidence:.3f} "
                   f"(< {SIMILARITY_CONFIDENCE} counts as different from ImageNet: {self.similarity})\n"
                   if self.similarity != "unknown" else
                   "likeness to ImageNet: not measured (the model has no ImageNet classifier)\n") +
                f"linear probe on frozen embeddings {probe}{skipped}\n"
                f"recommendation: {self.recommendation} (featx finetune --unfreeze {self.unfreeze})")


LARGE_PER_CLASS = 1000  # from this many images per class, the data set counts as large
SIMILARITY_CONFIDENCE = 0.3


def advise(root: str | os.PathLike, *, model: str = DEFAULT_BACKBONE, weights: str | None = None,
           sample: int = 300, device: str = "auto", seed: int = 0) -> Advice:
    """Place a labelled folder among the four transfer-learning cases (small/large x similar/different)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from .data import FileEntry, class_names_of, folder_to_walk, walk_images
    from .export import ensure_model_file
    from .heads import lbfgs_blas_single_threaded, near_copy_split_groups, one_per_group, stratified_folds
    from .pipeline import encode_files, softmax
    from .runtime import load_model

    entries = [e for e in walk_images(folder_to_walk(root)) if isinstance(e, FileEntry) and e.label is not None]
    classes = class_names_of(root)
    # a copy counts once: in the probe's folds it would be scored on what it trained on
    distinct, n_copies = without_copies([(e.path, classes.index(e.label)) for e in entries])
    kept = {path for path, _ in distinct}
    entries = [e for e in entries if e.path in kept]
    if len(classes) < 2 or not entries:
        raise FeatxError(f"{root}: advise needs images in at least two class folders")
    # the same share of every class (all of a small one), so a class of a few images is in the sample
    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for e in entries:
        by_class.setdefault(e.label, []).append(e)
    share = -(-sample // len(by_class))
    picked = [members[i] for members in by_class.values()
              for i in sorted(rng.choice(len(members), min(share, len(members)), replace=False))]
    model_file = ensure_model_file(model, weights=weights)
    engine = load_model(model_file, device=device, engine="onnx", spin=False)
    # a fine-tuned export's logits score its own classes, a merged classifier gives probabilities: neither
    # says how ImageNet-like the folder is (the digits' "confidence" under a digits model was 0.14, and nan)
    info = engine.info
    scores_imagenet = info.class_scores == "logits" and info.has_logits and len(info.class_names) == 1000
    if not scores_imagenet:
        _logger.warning("%s has no ImageNet classifier (%s): the folder's likeness to ImageNet is not measured; "
                        "advise with the backbone's name (--model %s) measures it", model_file,
                        f"its {len(info.class_names)} classes are its own" if info.has_logits else "no logits",
                        info.backbone)

    confidences, embeddings, labels, phashes, skipped = [], [], [], [], {}
    for entry, (_, embedding, logits, error, phash) in zip(
            picked, encode_files(engine, [e.path for e in picked], with_phashes=True)):
        if error:  # a bad file is left out of the sample, as embed leaves it out of the cache
            skipped[entry.key] = error
            continue
        embeddings.append(embedding)
        labels.append(entry.label)
        phashes.append(phash)
        if logits is not None and scores_imagenet:
            confidences.append(softmax(logits[None]).max())
    if not embeddings:
        raise FeatxError(f"{root}: none of the {len(picked)} sampled images could be decoded")
    X, y = np.stack(embeddings), np.array(labels)
    # a picture's near copies go to one fold, or the probe scores pictures it trained on
    groups, n_near = near_copy_split_groups(np.array(phashes, dtype=np.uint64), root, say=lambda line: None)
    names, counts = np.unique(y[one_per_group(groups, len(y))], return_counts=True)
    folds, probe, note = int(min(3, counts.min())), float("nan"), ""
    if len(names) < 2:
        note = "one class left in the sample"
    elif folds < 2:
        note = f"class '{names[counts.argmin()]}' has a single usable {'image' if groups is None else 'picture'}"
    else:
        folds_split = stratified_folds(y, folds, groups=groups, shuffle=True, seed=seed)
        with lbfgs_blas_single_threaded():
            probe = float(np.mean(cross_val_score(LogisticRegression(max_iter=2000), X, y, cv=folds_split)))
    confidence = float(np.mean(confidences)) if confidences else float("nan")
    per_class = len(entries) / len(classes)
    size = "large" if per_class >= LARGE_PER_CLASS else "small"
    similarity = ("unknown" if not confidences else
                  "similar" if confidence >= SIMILARITY_CONFIDENCE else "different")
    recommendation, unfreeze = {
        ("small", "similar"): ("frozen features + a head (train-head): the ImageNet features already fit", 0),
        ("large", "similar"): ("fine-tune the top blocks: enough data to adapt the highest features", 2),
        ("small", "different"): ("fine-tune the top blocks at a low learning rate with augmentation: "
                                 "the top features are ImageNet-specific, too little data for more", 2),
        ("large", "different"): ("fine-tune everything: the data can support it and differs from ImageNet", "all"),
        ("small", "unknown"): ("frozen features + a head (train-head) first; if it falls short, the top blocks "
                               "(--unfreeze 2): too little data for more", 0),
        ("large", "unknown"): ("fine-tune the top blocks: enough data to adapt the highest features", 2),
    }[(size, similarity)]
    return Advice(len(entries), len(classes), per_class, confidence, probe, size, similarity, recommendation,
                  unfreeze, probe_folds=folds, probe_note=note, skipped=skipped, n_copies=n_copies,
                  n_near_copies=n_near)
