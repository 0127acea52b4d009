"""Fine-tuning in torch: meaningful blocks, frozen stays frozen, checkpoint -> ONNX, the four cases."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.finetune import model_blocks


def test_blocks_are_the_architectures_own_units():
    def names(model: str) -> list[str]:
        return [n for n, _ in model_blocks(featx.load_backbone(model, weights="none").features)]

    # a norm layer belongs to the conv before it: --unfreeze 1 trains conv_head and bn2, never a BatchNorm alone
    assert names("efficientnet_lite0") == ["conv_stem+bn1"] + [f"blocks.{i}" for i in range(7)] + ["conv_head+bn2"]
    # ResNet's four stages whatever their depth (resnet50's stages hold 3 to 6 bottlenecks each)
    assert names("resnet18") == names("resnet50") == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    assert len([n for n in names("vgg16") if n.startswith("features[")]) == 5  # five conv blocks, cut at max-pooling
    # DenseNet has a max-pooling stem too, but its trunk is dense blocks, not plain layers
    assert names("densenet121")[-3:] == ["features.denseblock3", "features.transition3", "features.denseblock4+norm5"]
    # a ViT's trunk sits one level down: its 12 encoder layers
    vit = names("vit_b_16")
    assert len(vit) == 13 and vit[-1] == "encoder.layers.encoder_layer_11+ln"
    from featx.finetune import freeze_except_top

    # the top block trains, the class token (outside every block) with "all" only
    vit_features = featx.load_backbone("vit_b_16", weights="none").features
    freeze_except_top(vit_features, 1)
    assert vit_features.encoder.layers[-1].mlp[0].weight.requires_grad and not vit_features.class_token.requires_grad
    freeze_except_top(vit_features, "all")
    assert all(p.requires_grad for p in vit_features.parameters())

    with pytest.raises(featx.FeatxError, match=r"--unfreeze 6: this backbone has 5 blocks \(conv1\+bn1, layer1, "
                                               r"layer2, layer3, layer4\); take 0 to 5 or all"):
        freeze_except_top(featx.load_backbone("resnet18", weights="none").features, 6)


@pytest.mark.slow
def test_finetune_trains_only_the_top_blocks_and_reexports(small_digits, tmp_path, lite0_backbone):
    before = {k: v.clone() for k, v in lite0_backbone.features.state_dict().items()}
    ckpt = tmp_path / "ft.safetensors"
    (small_digits / "0" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")  # a corrupt photo costs itself
    (small_digits / "1" / "empty.png").write_bytes(b"")
    # what embed leaves out stays out of training too: a NAS's thumbnails of a photo (other bytes, the
    # same picture: one in each split would be validated on what it trained on), a hidden folder, and a
    # symlink loop (torchvision's ImageFolder walked it until the OS refused, every class filed under 3)
    thumbs = small_digits / "2" / "@eaDir" / "0003.png"
    thumbs.mkdir(parents=True)
    Image.open(next((small_digits / "2").glob("*.png"))).resize((96, 96)).convert("RGB").save(
        thumbs / "SYNOFILE_THUMB_M.jpg")
    (small_digits / ".thumbnails").mkdir()
    Image.new("RGB", (64, 64)).save(small_digits / ".thumbnails" / "x.png")
    (small_digits / "3" / "loop").symlink_to("..")
    lines = []
    umask = os.umask(0o022)
    try:
        result = featx.fine_tune(small_digits, ckpt, unfreeze=2, epochs=2, input_size=64, hflip=False,
                                batch_size=16, patience=5, log=lines.append)
    finally:
        os.umask(umask)
    assert ckpt.stat().st_mode & 0o777 == 0o644  # readable where the folder is shared (safetensors makes 0600)
    assert result.n_train + result.n_val == 62 and result.n_copies == 0  # 60 digits and the 2 bad files
    assert result.trainable == ["blocks.6", "conv_head+bn2"]
    assert sorted(Path(p).name for p in result.skipped) == ["empty.png", "zz_broken.jpg"]
    assert lines[0].startswith("skipped 2 files that cannot be decoded")
    assert len(result.history) == 2 and lines[1].startswith("Epoch 1/2 - ") and "val_accuracy" in lines[1]
    tuned = featx.load_backbone("efficientnet_lite0", weights=ckpt)
    after = tuned.features.state_dict()
    frozen_keys = [k for k in before if k.startswith(("conv_stem", "bn1", "blocks.0", "blocks.5"))]
    moved_keys = [k for k in before if k.startswith(("blocks.6", "conv_head")) and k.endswith("weight")]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # BN statistics too
    assert all(not torch.equal(before[k], after[k]) for k in moved_keys)
    assert tuned.class_names == [str(d) for d in range(10)] and tuned.classifier.out_features == 10
    best = min(result.history, key=lambda h: h.val_loss)
    assert featx.describe_file(ckpt) == (  # `featx info ft.safetensors`: what it is, how to use it
        f"{ckpt}: fine-tuned efficientnet_lite0 for 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), input 64x64, "
        f"blocks trained: blocks.6, conv_head+bn2, best at epoch {best.epoch} (val_accuracy "
        f"{best.val_accuracy:.4f}, val_loss {best.val_loss:.4f}); its training images' class means kept (its "
        f"export marks images unlike them); `featx export efficientnet_lite0 --weights "
        f"{ckpt} -o {ckpt.with_suffix('.onnx')}` makes it a model")
    renamed = shutil.copy(ckpt, tmp_path / "ft.ckpt")  # a checkpoint is known by its content, not its name
    assert featx.describe_file(renamed).startswith(f"{renamed}: fine-tuned efficientnet_lite0 for 10 classes")
    assert featx.load_backbone("efficientnet_lite0", weights=renamed).class_names == tuned.class_names

    onnx_path = tmp_path / "ft.onnx"
    info = featx.export_onnx(tuned, onnx_path)  # raises unless onnxruntime agrees with the tuned torch model
    assert info.class_names == tuned.class_names
    # trained at 64 pixels: exported and run at 64 (at the model's 224 the tuned layers see other scales)
    assert info.preprocess.input_size == (64, 64) and info.preprocess.resize_size == round(64 * 256 / 224)
    assert info.fingerprint != featx.read_model_info(featx.ensure_model_file(
        "efficientnet_lite0", models_dir=tmp_path / "m")).fingerprint

    resumed = featx.fine_tune(small_digits, ckpt, unfreeze=2, epochs=3, input_size=64, hflip=False,
                             batch_size=16, resume=True, log=lines.append)
    assert [h.epoch for h in resumed.history] == [1, 2, 3] and any("resuming" in line for line in lines)
    assert resumed.history[:2] == result.history  # the epochs before the resume came with the checkpoint
    assert Path(resumed.curves).stat().st_size > 20_000  # loss and accuracy over all three epochs
    # the folder unchanged: its hashes came with the checkpoint (not decoded again), and the split is the same
    assert f"perceptual hashes of 62 images from {ckpt} (the folder is unchanged since)" in lines
    assert resumed.val_files == result.val_files
    # one file touched since: the folder is hashed again
    lines.clear()
    os.utime(sorted((small_digits / "0").glob("*.png"))[0])
    featx.fine_tune(small_digits, ckpt, unfreeze=2, epochs=3, input_size=64, hflip=False, batch_size=16,
                    resume=True, log=lines.append)
    assert any("resuming" in line for line in lines) and not any("perceptual hashes of" in line for line in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_names_the_checkpoint_and_resume_goes_on_from_it(small_digits, tmp_path, sig, code, word):
    """A long fine-tune stopped with Ctrl-C (to the terminal's process group) or SIGTERM (a scheduler's time
    limit): one line says where the best epoch so far is and how to go on; that file is a whole checkpoint
    (written by rename), and --resume continues after its epoch. Progress bars run weakref callbacks,
    where Python loses a signal's exception: before featx sent it again, the run trained on to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from featx.finetune import _read_checkpoint

    ckpt = tmp_path / "ft.safetensors"
    cmd = [sys.executable, "-m", "featx", "finetune", str(small_digits), "-o", str(ckpt), "--unfreeze", "1",
           "--epochs", "200", "--patience", "200", "--input-size", "64", "--batch-size", "16", "--no-hflip"]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # as a user runs it: progress bars on
    # as in a terminal: a suite started in the background (`pytest &`) has SIGINT ignored, which children inherit
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:  # the first epoch saved
        time.sleep(0.2)
    time.sleep(1)  # mid-epoch
    os.killpg(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err and "ignored" not in err, err
    assert f"featx: {word}; the best epoch so far is in {ckpt}, the same command with --resume" in err
    saved = int(_read_checkpoint(ckpt)[1]["epoch"])
    assert 1 <= saved < 200
    resumed = featx.fine_tune(small_digits, ckpt, unfreeze=1, epochs=saved + 1, input_size=64, hflip=False,
                              batch_size=16, resume=True)
    assert [h.epoch for h in resumed.history][-2:] == [saved, saved + 1]


def test_resume_with_no_checkpoint_says_it_starts_from_the_first_epoch(small_digits, tmp_path):
    """--resume naming a file that is not there (a typo in -o) retrained from scratch without a word."""
    said: list[str] = []
    result = featx.fine_tune(small_digits, tmp_path / "ft-typo.safetensors", unfreeze=0, epochs=1, input_size=32,
                             hflip=False, resume=True, log=said.append)
    assert f"nothing to resume: {tmp_path / 'ft-typo.safetensors'} does not exist yet; training from epoch 1" in said
    assert [h.epoch for h in result.history] == [1]


def test_finetune_decodes_large_jpegs_at_reduced_scale_as_embed_does(small_digits, tmp_path):
    """A 108-megapixel JPEG was decoded whole at every epoch (a 12-megapixel one took 4x as long as at 1/4
    scale) and, being over --max-pixels whole, skipped as "cannot be decoded"; embed takes it, at 1/8."""
    import warnings

    from PIL import Image

    Image.open(next((small_digits / "3").iterdir())).convert("RGB").resize((12000, 9000)).save(
        small_digits / "3" / "scan.jpg", quality=30)
    with warnings.catch_warnings():  # nor does Pillow's warning of a "decompression bomb DOS attack" reach the user
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = featx.fine_tune(small_digits, tmp_path / "ft.safetensors", unfreeze=0, epochs=1, input_size=32,
                                 hflip=False, val_fraction=0.5, log=lambda line: None)
    assert result.skipped == {} and result.n_train + result.n_val == 61


def test_finetune_shows_a_bar_through_each_epoch(small_digits, tmp_path):
    """An epoch of a few thousand photos takes minutes on a CPU (the digits at 224 px: 83 s) and showed
    nothing until its line: a bar counts its training and validation images, cleared for the line."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "featx", "finetune", str(small_digits), "-o", str(tmp_path / "ft.safetensors"),
           "--unfreeze", "0", "--epochs", "2", "--input-size", "32", "--no-hflip"]
    import fcntl
    import pty
    import struct
    import termios
    import threading

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # as a user runs it: progress bars on
    terminal, stderr = pty.openpty()  # stderr a terminal: the live bar (in a log, a line every 30 s)
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new one is 0 columns wide
    shown = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the child closed its side
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, timeout=300)
    finally:
        os.close(stderr)
        reader.join(10)
        os.close(terminal)
    err = shown.decode(errors="replace")
    assert run.returncode == 0, err
    assert "epoch 1/2:   0%" in err and "epoch 2/2:   0%" in err and "| 0/60 [" in err, err
    assert [line[:10] for line in run.stdout.splitlines() if line.startswith("Epoch ")] == ["Epoch 1/2 ", "Epoch 2/2 "]


def test_losses_near_zero_are_printed_so_that_epochs_can_be_told_apart():
    """Six photo classes fine-tuned reached val_loss 1.3e-05, 1.8e-05 and 2.7e-05: each epoch's line said
    "val_loss: 0.0000", and "saved epoch 1 of 3, the lowest val_loss 0.0000" read as a tie broken at random."""
    from featx.finetune import EpochLog, loss_text

    lines = [EpochLog(epoch, 0.0082, 1.0, val_loss, 1.0, 5.0).line(3)
             for epoch, val_loss in ((1, 1.3178e-05), (2, 4.02e-05), (3, 0.25))]
    assert [line.split("val_loss: ")[1].split(" ")[0] for line in lines] == ["1.3178e-05", "4.0200e-05", "0.2500"]
    assert "loss: 0.0082 " in lines[0] and loss_text(0.0) == "0.0000"


def test_finetune_says_which_epoch_it_saved_and_why(small_digits, tmp_path, capsys):
    """The epoch kept is the lowest val_loss, which need not be the best val_accuracy: the line said "best
    val_accuracy 0.2083" of an epoch when an earlier one had scored 0.25."""
    from featx.cli import main
    from featx.finetune import _read_checkpoint, loss_text

    ckpt = tmp_path / "ft.safetensors"
    assert main(["-q", "finetune", str(small_digits), "-o", str(ckpt), "--unfreeze", "1", "--epochs", "3",
                 "--input-size", "64", "--batch-size", "16", "--no-hflip"]) == 0
    out = capsys.readouterr().out.splitlines()
    said = next(line for line in out if line.startswith("saved epoch "))
    assert out[out.index(said) - 1].startswith("class means of the 48 training images")  # done after the epochs
    meta = _read_checkpoint(ckpt)[1]
    assert said.startswith(f"saved epoch {meta['epoch']} of 3, "
                           f"the lowest val_loss {loss_text(float(meta['val_loss']))} "
                           f"(val_accuracy {float(meta['val_accuracy']):.4f}) -> {ckpt}"), said
    # the export command it prints, run as printed, makes the model file beside the checkpoint
    command = next(line for line in out if line.startswith("export it: featx ")).removeprefix("export it: featx ")
    assert main(["-q", *command.split()]) == 0 and (tmp_path / "ft.onnx").is_file()
    assert featx.read_model_info(tmp_path / "ft.onnx").class_names == [str(d) for d in range(10)]
    # a copy damaged inside its tensors (it still reads) is refused, not exported to other embeddings
    state = _read_checkpoint(ckpt)[0]
    weights = state["classifier.weight"].numpy().tobytes()
    data = bytearray(ckpt.read_bytes())
    data[data.find(weights) + 8:data.find(weights) + 72] = bytes(64)
    (tmp_path / "damaged.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["-q", *command.replace(str(ckpt), str(tmp_path / "damaged.safetensors")).split()]) == 2
    refusal = (f"featx: error: {tmp_path / 'damaged.safetensors'}: its tensors are not those featx wrote (their "
               "SHA-256 differs: damaged on disk or in a copy); fine-tune again\n")
    assert capsys.readouterr().err == refusal
    # featx info reads its tensors too: the damaged copy is refused there, the good one described
    assert main(["info", str(tmp_path / "damaged.safetensors")]) == 2 and capsys.readouterr().err == refusal
    assert main(["info", str(ckpt)]) == 0 and "no digest" not in capsys.readouterr().out
    # one written before featx kept the digest: described, saying damage inside it cannot be told
    from safetensors.torch import save_file

    del meta["tensors_sha256"]
    save_file(state, str(tmp_path / "older.safetensors"), metadata={"featx": json.dumps(meta)})
    assert main(["info", str(tmp_path / "older.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  it keeps no digest of its weights (an earlier featx's, or another tool's): damage inside them cannot be "
        "told; fine-tuned again it has one")


def test_finetune_takes_an_exported_file_as_the_model_it_was_made_from(small_digits, lite0_onnx, tmp_path,
                                                                       monkeypatch):
    """--model takes "backbone name or exported .onnx file" in every command, but finetune and bench said
    "unknown backbone" to a file: they take the torch weights the file names, checked against its hash.
    A checkpoint named without its folder is recorded by its whole path, found from any folder."""
    import json

    import onnx

    from featx.errors import WeightsError
    from featx.export import METADATA_KEY

    monkeypatch.chdir(tmp_path)
    result = featx.fine_tune(small_digits, "ft.safetensors", model=str(lite0_onnx), unfreeze=0, epochs=1,
                             input_size=32, hflip=False, log=lambda line: None)
    assert result.backbone == "efficientnet_lite0" and len(result.history) == 1
    tuned = tmp_path / "ft.onnx"
    featx.export_onnx(featx.load_backbone("efficientnet_lite0", weights="ft.safetensors"), tuned)
    monkeypatch.chdir(small_digits)  # elsewhere: "ft.safetensors" alone is not there
    featx.fine_tune(small_digits, tmp_path / "again.safetensors", model=str(tuned), unfreeze=0, epochs=1,
                    hflip=False, log=lambda line: None)
    from featx.finetune import _read_checkpoint

    assert _read_checkpoint(tmp_path / "again.safetensors")[1]["input_size"] == [32, 32]  # the tuned file's size
    assert featx.read_model_info(tuned).weights == str(tmp_path / "ft.safetensors")

    def exported_with(name: str, **changes) -> Path:
        proto = onnx.load(str(lite0_onnx))
        entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
        entry.value = json.dumps({**json.loads(entry.value), **changes})
        onnx.save(proto, str(tmp_path / name))
        return tmp_path / name

    gone = exported_with("gone.onnx", weights=str(tmp_path / "deleted.safetensors"))
    with pytest.raises(WeightsError, match=f"^{gone} was exported from torch weights \\(--model efficientnet_lite0 "
                                           f"--weights {tmp_path / 'deleted.safetensors'}\\) that cannot be loaded here"):
        featx.fine_tune(small_digits, tmp_path / "ft.safetensors", model=str(gone), epochs=1)
    other = exported_with("other.onnx", weights_sha256="0" * 64)
    with pytest.raises(WeightsError, match=f"hash to .*, {other} was exported from 000000000000…: give the backbone "
                                           "name and the weights"):
        featx.fine_tune(small_digits, tmp_path / "ft.safetensors", model=str(other), epochs=1)
    # bench times the torch model beside the file's: the same weights, by the same check
    with pytest.raises(WeightsError, match=f"{other} was exported from 000000000000…"):
        featx.bench_models(model=str(other), batch_sizes=[1], repeats=1, end_to_end=False, out_dir=None)


@pytest.mark.slow
def test_advise_tells_digits_from_natural_photos(digits_dir, tmp_path, lite0_onnx):
    from featx.samples import write_jpeg_folder

    digits = featx.advise(digits_dir, model=lite0_onnx, sample=120)
    photos = featx.advise(write_jpeg_folder(tmp_path / "photos", 60, classes=3), model=lite0_onnx, sample=60)
    assert digits.similarity == "different" and photos.similarity == "similar"
    assert digits.recommendation != photos.recommendation
    assert digits.imagenet_confidence < photos.imagenet_confidence
    assert "recommendation" in digits.text() and f"{digits.imagenet_confidence:.3f}" in digits.text()


@pytest.mark.slow
def test_advise_on_a_model_of_its_own_classes_does_not_call_the_folder_unlike_imagenet(small_digits, digits_cache,
                                                                                        lite0_onnx, tmp_path, caplog):
    """advise judges a folder's likeness to ImageNet by the ImageNet classifier's confidence. A merged
    classifier has no logits (the figure was nan, read as "different") and a fine-tuned export's logits
    are its own classes: the likeness is not measured there, and the recommendation goes by size alone."""
    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, C=1.0)
    classifier = featx.export_classifier(lite0_onnx, head, tmp_path / "digits.onnx")
    advice = featx.advise(small_digits, model=str(classifier), sample=60)
    assert advice.similarity == "unknown" and advice.size == "small" and advice.unfreeze == 0
    assert "likeness to ImageNet: not measured" in advice.text() and "nan" not in advice.text()
    assert advice.probe_accuracy > 0.5  # the probe still runs on its embeddings
    assert "advise with the backbone's name (--model efficientnet_lite0) measures it" in caplog.text


@pytest.mark.slow
def test_finetune_starts_from_a_trained_head(small_digits, tmp_path, lite0_onnx):
    """With the linear probe as the start, epoch 0 of fine-tuning already classifies like the head."""
    from featx.finetune import head_from_file
    from featx.heads import load_head

    featx.embed_folder(small_digits, tmp_path / "c.h5", model=lite0_onnx, workers=0)
    head = tmp_path / "h.safetensors"
    featx.train_head(tmp_path / "c.h5", head, C=1.0, test_size=0.2)
    module = head_from_file(head, 1280, [str(d) for d in range(10)])
    with pytest.raises(featx.FeatxError) as refused:  # a head of another folder's classes, said plainly
        head_from_file(head, 1280, ["cats", "dogs"])
    assert str(refused.value) == (f"head {head} was trained on the classes 0, 1, 2, 3, 4, 5, 6, 7, 8, 9; the folder's "
                                  "are cats, dogs: give a head trained on this folder's cache, or no --head")
    data = featx.load_embeddings(tmp_path / "c.h5")
    with torch.no_grad():
        torch_probs = torch.softmax(module(torch.from_numpy(data.embeddings)), 1).numpy()
    assert np.abs(torch_probs - load_head(head).head.predict_proba(data.embeddings)).max() < 1e-4
    result = featx.fine_tune(small_digits, tmp_path / "ft.safetensors", head=head, unfreeze=1, epochs=1,
                             hflip=False, batch_size=16, log=lambda line: None)
    assert result.history[0].val_accuracy > 0.5
    # the checkpoint, the cache or the model given as a head: each named as what it is, and where it goes
    ckpt = tmp_path / "ft.safetensors"
    for given, said in ((ckpt, f"is a fine-tuning checkpoint, not a head: `featx export efficientnet_lite0 "
                               f"--weights {ckpt} -o {ckpt.with_suffix('.onnx')}` makes a model of it"),
                        (tmp_path / "c.h5", "is an embedding cache, not a head (train-head CACHE -o HEAD makes one)"),
                        (lite0_onnx, "is a model, not a head: give it as --model")):
        with pytest.raises(featx.FeatxError) as e:
            load_head(given)
        assert str(e.value).startswith(f"{given} {said}")


def test_finetune_refuses_folders_it_cannot_split_before_loading_the_model(small_digits, tmp_path, capsys):
    """The split is checked before the backbone loads (a model that does not exist is never reached);
    copies (same bytes and class) are left out first, so they count once."""
    from featx.errors import FeatxError

    for i, photo in enumerate(sorted((small_digits / "5").iterdir())[:3]):
        shutil.copy(photo, photo.with_name(f"copy-{i}.png"))
    import re

    with pytest.raises(FeatxError, match=f"^{re.escape(str(small_digits))}: --val-fraction 0.9 holds out 54 of 60 "
                                         "images for validation"):  # the folder named
        featx.fine_tune(small_digits, tmp_path / "ft.safetensors", val_fraction=0.9, model="no_such_model")
    from featx.cli import main

    assert main(["finetune", str(small_digits), "-o", str(tmp_path / "ft.safetensors"), "--val-fraction", "0.9",
                 "--model", "no_such_model"]) == 2
    assert "--val-fraction 0.9 holds out 54 of 60 images" in capsys.readouterr().err
    for extra in sorted((small_digits / "4").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(FeatxError, match="single image, so none can be held out for validation: '4'"):
        featx.fine_tune(small_digits, tmp_path / "ft.safetensors", model="no_such_model")
    with pytest.raises(FeatxError, match="needs images in class subfolders"):
        featx.fine_tune(small_digits / "3", tmp_path / "ft.safetensors", model="no_such_model")


def test_advise_skips_bad_files_and_says_why_the_probe_did_not_run(small_digits, lite0_onnx):
    """A corrupt photo is left out of the sample (not the end of the advice); a class with one image
    is still sampled, and the probe that cannot cross-validate it says so instead of printing nan."""
    (small_digits / "0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    for extra in sorted((small_digits / "4").iterdir())[1:]:
        extra.unlink()
    shutil.copy(next((small_digits / "4").iterdir()), small_digits / "4" / "the same four.png")  # counts once
    advice = featx.advise(small_digits, model=lite0_onnx)  # the sample takes every image of these 60
    assert list(advice.skipped) == ["0/broken.jpg"] and "1 sampled file skipped" in advice.text()
    assert advice.probe_accuracy != advice.probe_accuracy and "class '4' has a single usable image" in advice.text()
    assert advice.n_copies == 1 and "1 copy of other images left out" in advice.text()
    assert "nan" not in advice.text() and advice.recommendation
    (small_digits / "4").rename(small_digits.parent / "4")  # the rest: every class has 2+ images in the sample
    advice = featx.advise(small_digits, model=lite0_onnx, sample=18)  # 2 of each of the 9 classes
    assert advice.probe_accuracy > 0.3 and advice.probe_folds == 2 and "(2-fold CV on the sample)" in advice.text()


def test_finetune_keeps_a_pictures_resized_copies_on_one_side_of_its_split(small_digits, tmp_path):
    """A photo and its export at another size and quality have other bytes: one in each split would be
    validated on what it trained on. Each picture's copies go to one side, and the log says how many."""
    originals = [sorted((small_digits / str(d)).iterdir())[k] for d in range(10) for k in (0, 1)]
    for photo in originals:
        Image.open(photo).convert("RGB").resize((48, 48), Image.BICUBIC).save(
            photo.with_name(f"{photo.stem} export.jpg"), quality=70)
    lines = []
    result = featx.fine_tune(small_digits, tmp_path / "ft.safetensors", unfreeze=0, epochs=1, input_size=32,
                             hflip=False, batch_size=32, log=lines.append)
    validated = {Path(p).name for p in result.val_files}
    assert result.n_train + result.n_val == 80 and len(validated) == result.n_val and 12 <= result.n_val <= 24
    assert result.n_near_copies >= 40 and any(f"{result.n_near_copies} images of {small_digits} are near copies"
                                              in line for line in lines)
    together = [(p.name in validated) == (f"{p.stem} export.jpg" in validated) for p in originals]
    assert all(together) and sum(p.name in validated for p in originals) >= 2  # some pairs validate, whole


def test_advise_keeps_near_copies_in_one_fold_of_its_probe(small_digits, lite0_onnx):
    for photo in sorted(small_digits.glob("*/*.png"))[::3]:
        Image.open(photo).convert("RGB").resize((40, 40)).save(photo.with_name(f"{photo.stem} small.jpg"))
    advice = featx.advise(small_digits, model=lite0_onnx)
    assert advice.n_near_copies >= 40 and f"{advice.n_near_copies} near copies, each picture's in one fold" in advice.text()
    assert 0.3 < advice.probe_accuracy < 1


def test_a_fine_tuned_export_is_not_scored_on_the_pictures_it_was_tuned_on(small_digits, photos_dir, tmp_path,
                                                                            caplog):
    """evaluate on a test folder holding some of the tuning folder's pictures (saved again at another size)
    leaves them out: the export keeps the perceptual hashes of what it was tuned on. It keeps its training
    images' class means too, so classify marks a photo unlike them, as predict does with a head."""
    import logging

    import onnx

    from featx.errors import ModelFileError
    from featx.samples import write_digits_folder

    ckpt = tmp_path / "ft.safetensors"
    featx.fine_tune(small_digits, ckpt, unfreeze=0, epochs=1, input_size=32, hflip=False, log=lambda line: None)
    model = tmp_path / "ft.onnx"
    featx.export_onnx(featx.load_backbone("efficientnet_lite0", weights=ckpt), model)
    info = featx.read_model_info(model)
    known = len(info.trained_phashes)
    assert 50 <= known <= 60 and f"knows the {known} pictures it was trained and validated on" in info.summary()
    assert "logits for 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in info.summary()  # its own, named
    assert f"marks images unlike its training images (class_mean_cosine under {info.typical_cosine:.3f})" \
        in info.summary()
    photos = sorted(photos_dir.iterdir())
    tuned_on = sorted(small_digits.rglob("*.png"))[::10]
    rows = featx.classify(photos + tuned_on, model=model, top=1)
    assert [r.unlike_training for r in rows] == [True] * len(photos) + [False] * len(tuned_on)
    import onnxruntime as ort

    from featx.data import load_image

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (cosine,) = session.run(["class_mean_cosine"], {"images": np.stack([load_image(p, info.preprocess)
                                                                        for p in photos + tuned_on])})
    assert cosine == pytest.approx([r.class_mean_cosine for r in rows], abs=1e-4)  # the file's own output

    test = tmp_path / "test"  # 20 digits it never saw, and 10 of its own at 48 px as JPEG
    for path in write_digits_folder(tmp_path / "more", size=32, limit=80).rglob("*.png"):
        if int(path.stem) < 60:  # the tuning folder's
            continue
        (test / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(test / path.parent.name / path.name)
    tuned = sorted(small_digits.rglob("*.png"))[::6]
    for path in tuned:
        (test / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize((48, 48)).save(test / path.parent.name / f"{path.stem}.jpg", quality=80)
    with caplog.at_level(logging.WARNING, logger="featx"):
        report = featx.evaluate_classifier(test, model)
    assert 18 <= report.n_test <= 20 and not any(key.endswith(".jpg") for key, *_ in report.mistakes)
    assert report.n_unlike is not None and report.n_unlike <= 4  # digits like those it was tuned on
    left_out = 30 - report.n_test
    assert f"{left_out} of 30 images of {test} are pictures ft.onnx was trained on" in caplog.text

    proto = onnx.load(str(model))  # a damaged list is a damaged file, refused with its reason
    next(p for p in proto.metadata_props if p.key == "featx_trained_phashes").value = "not base64!"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelFileError, match="bad.onnx: featx metadata is unreadable"):
        featx.read_model_info(tmp_path / "bad.onnx")


@pytest.mark.parametrize("command", [["advise"], ["finetune", "-o", "ft.safetensors"], ["embed", "-o", "c.h5"]])
def test_a_folder_command_given_a_missing_folder_or_a_file_says_which_in_one_line(command, tmp_path, capsys):
    # no model is reached (no_such_model would be another error): the folder is checked first
    from featx.cli import main

    for given, said in ((tmp_path / "typo", "does not exist"), (tmp_path / "photo.jpg", "is not a folder")):
        if given.suffix:
            given.write_bytes(b"\xff\xd8\xff")
        argv = [command[0], str(given), *command[1:], "--model", "no_such_model"]
        assert main([a if not a.endswith((".h5", ".safetensors")) else str(tmp_path / a) for a in argv]) == 2
        assert capsys.readouterr().err.strip() == f"featx: error: {given} {said}"
