import contextlib
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading

import pytest
import torch

import featx
from featx.backbones import load_state_dict_file, register_backbone
from featx.errors import UnknownBackboneError, WeightsError


def test_default_backbone_is_lite0_with_its_own_preprocessing(lite0_backbone):
    import timm.data

    assert featx.DEFAULT_BACKBONE == "efficientnet_lite0"
    cfg = timm.data.resolve_data_config({}, model=lite0_backbone.features)
    p = lite0_backbone.preprocess
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)
    assert p.mean == tuple(cfg["mean"]) and p.interpolation == cfg["interpolation"]
    assert p.input_size == cfg["input_size"][1:]
    assert lite0_backbone.embed_dim == 1280 and len(lite0_backbone.class_names) == 1000


def test_bundled_lite_weights_classify_like_imagenet(lite0_backbone, photos_dir):
    """The lukemelas -> timm position mapping must give a working classifier, not just matching shapes."""
    from featx.data import load_image

    x = torch.from_numpy(load_image(photos_dir / "coffee.png", lite0_backbone.preprocess)).permute(2, 0, 1)[None]
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = lite0_backbone.classifier(lite0_backbone.features(x))
    assert lite0_backbone.class_names[int(logits.argmax())] == "espresso"


def test_inception_preprocessing_comes_from_weights_metadata():
    """And the model is built as its weights are by torchvision: it scales the ImageNet-normalised input
    back to the [-1, 1] Google trained it on (GoogLeNet's logits against torchvision's: test_export)."""
    import torchvision

    bb = featx.load_backbone("inception_v3", weights="none")
    t = torchvision.models.Inception_V3_Weights.DEFAULT.transforms()
    assert bb.preprocess.input_size == (299, 299) == (t.crop_size[0], t.crop_size[0])
    assert bb.preprocess.resize_size == t.resize_size[0]
    assert bb.embed_dim == 2048
    assert bb.features.transform_input and bb.features.AuxLogits is None


def test_a_vit_is_built_for_the_image_size_its_weights_take():
    """torchvision's default ViT-H/14 weights (SWAG) take 518x518 images: featx built the builder's 224 model,
    so its export failed with an AssertionError traceback on the 518 images its preprocessing gives (and
    pretrained weights would not fit its position embeddings). Built on the meta device: no time, no memory."""
    with torch.device("meta"):
        bb = featx.load_backbone("vit_h_14", weights="none")
    assert bb.features.image_size == bb.preprocess.input_size[0] == 518


def test_unknown_name_is_refused_with_the_closest_names(tmp_path, caplog):
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'resnet5000'"):
        featx.load_backbone("resnet5000")
    with pytest.raises(UnknownBackboneError, match=r"did you mean resnet50, "):  # a typo: the names it is near
        featx.load_backbone("resnet5")
    with pytest.raises(UnknownBackboneError, match=r"model name \(featx list-models shows them\)"):
        featx.load_backbone("qqqqzzzz")
    # nothing is announced as exporting, and no file is left for it
    with caplog.at_level(logging.INFO, logger="featx"), pytest.raises(UnknownBackboneError):
        featx.ensure_model_file("resnet5", models_dir=tmp_path)
    assert "exporting" not in caplog.text and not list(tmp_path.iterdir())


def test_list_models_filters_by_substring_and_says_when_nothing_matches(capsys):
    from featx.cli import main

    assert main(["list-models", "resnet50"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"resnet50", "timm/resnet50", "wide_resnet50_2"} <= set(listed) and all("resnet50" in n for n in listed)
    assert main(["list-models", "resnet5000"]) == 1  # as grep: a script can tell a typo from a match
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip() == "featx: no model name contains 'resnet5000'"


def test_each_listed_name_loads_the_model_it_lists():
    """torchvision and timm both have resnet18 (different modules, different weights): `resnet18` loads
    torchvision's, so timm's is listed as `timm/resnet18`, a name that loads it. Every name is listed once."""
    names = featx.list_backbones()
    assert len(names) == len(set(names))
    assert {"resnet18", "timm/resnet18", "efficientnet_lite0", "timm/efficientnet_lite0"} <= set(names)
    assert "timm/xception65" not in names and "xception65" in names  # timm's alone: its plain name
    assert set(featx.list_backbones("timm")) & {"resnet18", "efficientnet_lite0"} == set()
    for name, library in (("resnet18", "torchvision"), ("timm/resnet18", "timm")):
        backbone = featx.load_backbone(name, weights="none")
        assert {type(m).__module__.split(".")[0] for m in backbone.features.modules()} & {"torchvision", "timm"} \
            == {library}


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("efficientnet_lite0")(lambda weights: None)


def test_pretrained_download_failure_names_the_alternatives(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-featx-test")
    with pytest.raises(WeightsError) as e:
        featx.load_backbone("resnet18", weights="pretrained")
    msg = str(e.value)
    assert "could not download pretrained weights for resnet18" in msg
    assert "--weights PATH" in msg and "--weights none" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["efficientnet_lite0", "timm/resnet18"])
def test_a_pretrained_download_from_the_hugging_face_hub_that_fails_is_one_line(name, monkeypatch, tmp_path):
    """timm's weights come through huggingface_hub, whose error (LocalEntryNotFoundError) was a traceback
    for the EfficientNet-Lite names. Offline mode fails at once where no network retries for 46 s."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached to fall back on
    with pytest.raises(WeightsError) as e:
        featx.load_backbone(name, weights="pretrained")
    msg = str(e.value)
    assert msg.startswith(f"could not download pretrained weights for {name.removeprefix('timm/')} (")
    assert "--weights none" in msg and "\n" not in msg
    assert ("--weights bundled (the default)" in msg) == (name == "efficientnet_lite0")


def _no_network(monkeypatch, why="no name resolves"):
    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    def dropped(*args, **kwargs):
        raise TimeoutError("timed out")

    if why == "no name resolves":
        monkeypatch.setattr(socket, "getaddrinfo", unknown)
    else:  # a firewall that refuses the connection, or drops it
        monkeypatch.setattr(socket, "create_connection", {"refused": refused, "timed out": dropped}[why])
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("why", ["no name resolves", "refused", "timed out"])
def test_without_a_network_a_timm_download_fails_at_once_not_after_retries(why, monkeypatch, tmp_path, caplog):
    """With no network huggingface_hub retried each file five times, 52 s and 46 lines of "Retrying in 8s"
    for `featx export resnet18.a1_in1k`, before featx's one-line error: a Hub whose name does not
    resolve is read from the local cache only, and offline mode is left as it was."""
    from huggingface_hub import constants

    _no_network(monkeypatch, why)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError) as e:
        featx.load_backbone("timm/resnet18", weights="pretrained")
    assert str(e.value).startswith("could not download pretrained weights for resnet18 (")
    assert not [r for r in caplog.records if "Retrying" in r.getMessage() or "thrown while" in r.getMessage()]
    reason = {"no name resolves": "its name does not resolve", "refused": "Connection refused"}.get(why, why)
    assert f"cannot be reached ({reason}" in caplog.text and "weights only from the local" in caplog.text
    assert constants.HF_HUB_OFFLINE is False


def test_without_a_network_timm_weights_in_the_hugging_face_cache_load(monkeypatch, tmp_path):
    """Weights downloaded once still load without a network in the Hub's offline mode (read from its cache)."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    torch.manual_seed(3)
    cached = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    snapshot = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    save_file(cached.state_dict(), str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("ab" * 20)
    _no_network(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    backbone = featx.load_backbone("timm/resnet18", weights="pretrained")
    assert torch.equal(backbone.features.conv1.weight, cached.conv1.weight)
    assert backbone.weights == "pretrained" and constants.HF_HUB_OFFLINE is False


@contextlib.contextmanager
def _local_proxy(answer: bytes):
    """An HTTP proxy on this machine that answers every request, CONNECT included, with ``answer`` and
    then closes the connection; yields its URL."""

    class Answer(socketserver.StreamRequestHandler):
        def handle(self):
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.wfile.write(answer)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_proxy_that_cannot_be_reached_fails_a_timm_download_at_once(monkeypatch, tmp_path, caplog):
    """With HTTPS_PROXY naming a proxy that is down (VPN off, the proxy's port closed) huggingface_hub
    retried for 54 s; the proxy is what a download connects to first, so it is the one probed. A host
    that NO_PROXY lets through is probed directly."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    proxy = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HTTPS_PROXY", proxy.replace("//", "//someone:secret@"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError) as e:
        featx.load_backbone("timm/resnet18", weights="pretrained")
    assert str(e.value).startswith("could not download pretrained weights for resnet18 (")
    assert f"the proxy {proxy} cannot be reached (Connection refused)" in caplog.text  # its password not shown
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert constants.HF_HUB_OFFLINE is False

    caplog.clear()
    monkeypatch.setenv("NO_PROXY", "localhost,huggingface.co")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "unknown")))
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError):
        featx.load_backbone("timm/resnet18", weights="pretrained")
    assert f"{constants.ENDPOINT} cannot be reached (its name does not resolve)" in caplog.text


def test_a_proxy_that_refuses_the_hub_is_one_line_not_a_traceback(monkeypatch, tmp_path):
    """A proxy that answers CONNECT with 403 raised the HTTP client's own ProxyError, which is none of
    Python's errors, through featx as a traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with _local_proxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        with pytest.raises(WeightsError) as e:
            featx.load_backbone("timm/resnet18", weights="pretrained")
    assert str(e.value).startswith("could not download pretrained weights for resnet18 (ProxyError: 403 Forbidden)")


def test_the_hubs_retry_warnings_are_printed_once(tmp_path):
    """A proxy that lets the connection through and then drops it makes huggingface_hub retry, saying so
    in warnings that its own handler and featx's both printed: each line came twice."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "NO_PROXY": ""}
    with _local_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n") as proxy:
        env["HTTPS_PROXY"] = proxy
        run = subprocess.Popen([sys.executable, "-m", "featx", "export", "resnet18.a1_in1k", "-o",
                                str(tmp_path / "r18.onnx")], stderr=subprocess.PIPE, text=True, env=env)
        lines = []
        try:
            for line in run.stderr:  # up to the second retry: about 5 s, not the 50 s of all five
                lines.append(line.rstrip("\n"))
                if line.startswith("Retrying in 2s"):
                    break
        finally:
            run.kill()
            run.wait()
    retries = [line for line in lines if line.startswith("Retrying in")]
    failures = [line for line in lines if "thrown while requesting" in line]
    assert retries == ["Retrying in 1s [Retry 1/5].", "Retrying in 2s [Retry 2/5]."], lines
    assert len(failures) == 2, lines

    from featx.cli import main  # in a caller's process the Hub's log goes on reaching the caller's handlers

    assert main(["-q", "list-models", "resnet18"]) == 0
    assert logging.getLogger("huggingface_hub").propagate is True


def test_local_checkpoint_loads_and_fixes_the_weights(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    a = featx.load_backbone("resnet18", weights=tmp_path / "r18.pth")
    b = featx.load_backbone("resnet18", weights=tmp_path / "r18.safetensors")
    c = featx.load_backbone("resnet18", weights="none")
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()
    assert torch.equal(a.features.conv1.weight, model.conv1.weight)


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/featx-pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(WeightsError, match="refused, the checkpoint holds an object of posix.system, which loading "
                                          "would run code"):
        load_state_dict_file(path)
    import os

    assert not os.path.exists("/tmp/featx-pwned")


def test_a_training_scripts_checkpoint_loads_and_a_file_that_is_none_is_named(tmp_path):
    """timm's train.py saves epoch, arch, optimizer state and its argparse arguments beside the state
    dict: the weights load from it (no code runs to build a Namespace). A file that is not a checkpoint
    at all (a download that saved an HTML page) says so, not that it would run code."""
    import argparse

    import torchvision

    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    torch.save({"epoch": 12, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=12, amp=True), "version": 2},
               tmp_path / "checkpoint-12.pth.tar")
    trained = featx.load_backbone("resnet18", weights=tmp_path / "checkpoint-12.pth.tar")
    assert trained.weights_sha256() == featx.load_backbone("resnet18", weights=tmp_path / "plain.pth").weights_sha256()

    (tmp_path / "resnet18.pth").write_text("<!DOCTYPE html><html>Sign in to download</html>")
    with pytest.raises(WeightsError, match=r"not a torch checkpoint \(it starts with b'<!DOCTYPE html><'\)"):
        load_state_dict_file(tmp_path / "resnet18.pth")


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"does not fit.*unexpected .*layer1\.2"):
        featx.load_backbone("resnet18", weights=tmp_path / "r34.pth")
