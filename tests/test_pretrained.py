"""Loading backbone weights from local files and URLs (served from this machine, never the internet)."""
import functools
import hashlib
import http.server
import threading

import pytest
import timm
import torch

from segkit.errors import CheckpointError
from segkit.models.pretrained import IMAGENET_URLS, load_pretrained, read_state_dict, resolve_source
from segkit.models.resnest import create_backbone


def _save_with_hash_name(state, directory, stem):
    """Save like the original release: ``stem-<sha256 prefix>.pth``."""
    tmp = directory / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = directory / f"{stem}-{digest}.pth"
    tmp.rename(path)
    return path


def _same_features(a, b):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x)[-1], b.eval()(x)[-1])


@pytest.fixture
def imagenet_model():
    torch.manual_seed(1)
    # An ImageNet checkpoint as released: backbone keys plus the 1000-way classifier.
    return create_backbone("resnest14", num_classes=1000)


@pytest.fixture
def http_dir(tmp_path):
    """A loopback HTTP server over tmp_path/www for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def test_local_original_checkpoint_drops_classifier_and_loads_strictly(tmp_path, imagenet_model):
    path = _save_with_hash_name(imagenet_model.state_dict(), tmp_path, "resnest14")
    model = create_backbone("resnest14", output_stride=8)
    load_pretrained(model, str(path), "resnest14")
    reference = create_backbone("resnest14", output_stride=8)
    reference.load_state_dict({k: v for k, v in imagenet_model.state_dict().items() if not k.startswith("fc.")})
    assert _same_features(model, reference)


def test_url_is_fetched_into_hub_cache_with_hash_check(http_dir, hub_dir, imagenet_model):
    root, base = http_dir
    path = _save_with_hash_name(imagenet_model.state_dict(), root, "resnest14")
    model = create_backbone("resnest14")
    load_pretrained(model, f"{base}/{path.name}", "resnest14")
    cached = hub_dir / "checkpoints" / path.name
    assert cached.is_file() and cached.read_bytes() == path.read_bytes()
    path.unlink()  # a second load is served from the cache
    again = create_backbone("resnest14")
    load_pretrained(again, f"{base}/{path.name}", "resnest14")
    assert _same_features(model, again)


def test_url_with_wrong_hash_is_rejected(http_dir, hub_dir, imagenet_model):
    root, base = http_dir
    torch.save(imagenet_model.state_dict(), root / "resnest14-deadbeef.pth")
    with pytest.raises(CheckpointError, match="invalid hash value"):
        load_pretrained(create_backbone("resnest14"), f"{base}/resnest14-deadbeef.pth", "resnest14")
    assert not (hub_dir / "checkpoints" / "resnest14-deadbeef.pth").exists()


def test_unreachable_url_says_what_to_do(hub_dir):
    with pytest.raises(CheckpointError, match="download it yourself"):
        read_state_dict("http://127.0.0.1:9/resnest14-00000000.pth")


@pytest.mark.parametrize("ours,theirs", [("resnest50", "resnest50d"), ("resnet50d", "resnet50d")])
def test_timm_weights_load_strictly(tmp_path, ours, theirs):
    ref = timm.create_model(theirs, pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    model = create_backbone(ours)
    load_pretrained(model, str(tmp_path / "w.pth"), ours)
    assert torch.equal(model.layer4[-1].conv3.weight, ref.layer4[-1].conv3.weight)


def test_wrapped_and_ddp_prefixed_state_dict(tmp_path, imagenet_model):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in imagenet_model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ddp.pth")
    model = create_backbone("resnest14", num_classes=1000)
    load_pretrained(model, str(tmp_path / "ddp.pth"), "resnest14")
    assert _same_features(model, imagenet_model)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create_backbone("resnest14", output_stride=8)
    model.train()(torch.randn(2, 3, 32, 32))  # move the running statistics away from their init
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    restored = create_backbone("resnest14", output_stride=8)
    restored.load_state_dict(read_state_dict(tmp_path / "ckpt.pth"), strict=True)
    assert _same_features(model, restored)


def test_mismatched_architecture_lists_keys_and_hints(tmp_path):
    with torch.device("meta"):
        state = create_backbone("resnest50").state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in state.items()}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_backbone("resnest101"), str(tmp_path / "r50.pth"), "resnest101")
    msg = str(err.value)
    assert "r50.pth does not fit" in msg
    assert "missing keys (" in msg and "layer3.6." in msg
    assert "shape mismatch" in msg and "conv1.0.weight (32, 3, 3, 3) vs (64, 3, 3, 3)" in msg
    assert "hint: is this a resnest101 checkpoint?" in msg


def test_unexpected_keys_are_listed(tmp_path, imagenet_model):
    state = dict(imagenet_model.state_dict(), **{"extra.weight": torch.zeros(1)})
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra.weight"):
        load_pretrained(create_backbone("resnest14"), str(tmp_path / "extra.pth"), "resnest14")


def test_corrupt_missing_and_unsafe_files(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x04not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pth: not a usable PyTorch checkpoint"):
        read_state_dict(tmp_path / "corrupt.pth")
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nothing.pth"):
        read_state_dict(tmp_path / "nothing.pth")
    # weights_only=True refuses arbitrary pickled objects.
    torch.save({"weights": torch.zeros(1), "obj": CheckpointError("x")}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe.pth: not a usable"):
        read_state_dict(tmp_path / "unsafe.pth")
    torch.save({"optimizer": {}}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(tmp_path / "nostate.pth")


def test_imagenet_alias():
    assert resolve_source("imagenet", "resnest50").endswith("/resnest50-528c19ca.pth")
    assert set(IMAGENET_URLS) >= {"resnest50", "resnest101", "resnest200", "resnest269"}
    assert resolve_source("/x/w.pth", "resnest50") == "/x/w.pth"
    with pytest.raises(CheckpointError, match="no published ImageNet weights are known for backbone 'resnet50d'"):
        resolve_source("imagenet", "resnet50d")
    load_pretrained(create_backbone("resnest14"), None, "resnest14")  # nothing to load is fine
