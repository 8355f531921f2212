"""segkit.Predictor: the evaluator's labels from Python, every input kind, self-describing checkpoints
(a folder-trained model predicts after its data is gone), and bad input."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import make_folder
from segkit import Prediction, Predictor
from segkit.checkpoints.load import load_model
from segkit.data.label_space import LabelSpace
from segkit.inference.multiscale import predict_image
from segkit.inference.options import InferenceOptions
from segkit.errors import CheckpointError, DataError
from train_helpers import TINY

# The demo images are 32 x 32 (TINY): multi-scale + flip covers them with windows at scale 1.25.
DEMO_VAL = "demo/ADEChallengeData2016/images/validation"


@pytest.fixture(scope="module")
def data_root(shared_data_root):
    return shared_data_root


def val_images(data_root):
    return sorted((data_root / DEMO_VAL).glob("*.jpg"))


@pytest.mark.parametrize("tta, options", [(False, ["eval.scales=null", "eval.flip=false"]), (True, [])],
                         ids=["single-scale", "multi-scale+flip"])
def test_predictor_gives_eval_seg_exported_labels(tmp_path, data_root, cli_eval, trained_best, tta, options):
    masks = tmp_path / "masks"
    cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={tmp_path / 'e'}", f"export.dir={masks}", *options], data_root)
    predictor = Predictor.from_checkpoint(trained_best, device="cpu", tta=tta)
    assert predictor.options.scales == ((0.75, 1.0, 1.25) if tta else None) and predictor.options.flip is tta
    files = val_images(data_root)
    assert len(files) == 2
    one_by_one = [predictor.predict(f) for f in files]
    for f, prediction in zip(files, one_by_one + predictor.predict(files)):
        exported = np.asarray(Image.open(masks / "labels" / f"{f.stem}.png"))  # the demo's format: class ids
        assert prediction.labels.shape == exported.shape
        assert (prediction.encoded() == exported).all()  # 100% of the pixels

    # eval_seg.py predict.input=DIR goes through the Predictor: the same labels again.
    out = tmp_path / "predicted"
    proc = cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={tmp_path / 'p'}", f"predict.input={files[0].parent}",
                     f"export.dir={out}", *options], data_root)
    assert "wrote predictions of 2 images" in proc.stdout
    for f in files:
        assert (np.asarray(Image.open(out / "labels" / f"{f.stem}.png"))
                == np.asarray(Image.open(masks / "labels" / f"{f.stem}.png"))).all()


def test_every_input_kind_gives_the_same_prediction(data_root, trained_best):
    predictor = Predictor.from_checkpoint(trained_best, device="cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    path = data_root.parent / "photo.png"
    Image.fromarray(rgb).save(path)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    reference = predictor.predict(rgb, probabilities=True)
    assert isinstance(reference, Prediction) and reference.labels.shape == (37, 45)
    for x in (path, str(path), Image.fromarray(rgb), chw, chw.float() / 255, Image.fromarray(rgb).convert("RGBA")):
        assert (predictor.predict(x).labels == reference.labels).all(), type(x)
    assert predictor.predict(path).name == "photo"

    # A list of any sizes: equal-sized images share forwards, each keeps its own size.
    batch = predictor.predict([rgb, rgb[:20, :31], rgb, rgb])
    assert [p.labels.shape for p in batch] == [(37, 45), (20, 31), (37, 45), (37, 45)]
    assert all((p.labels == reference.labels).all() for p in batch[2:])

    # Probabilities: the single-scale logits' softmax, at the input size.
    probs = reference.probabilities
    assert probs.shape == (7, 37, 45) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert (probs.argmax(0) == reference.labels).all()
    x = predictor.label_space.preprocess(torch.from_numpy(rgb))
    logits = predict_image(predictor.model, x, InferenceOptions(), pad_value=predictor.label_space.preprocess.pad_value)
    assert np.allclose(probs, logits.softmax(0).numpy(), atol=1e-6)
    tta = Predictor.from_checkpoint(trained_best, device="cpu", tta=[0.5, 1.0]).predict(rgb, probabilities=True)
    assert np.allclose(tta.probabilities.sum(0), 1, atol=1e-5) and (tta.probabilities.argmax(0) == tta.labels).all()


def test_prediction_draws_and_saves_like_the_exporter(tmp_path, trained_best):
    predictor = Predictor.from_checkpoint(trained_best, device="cpu")
    rgb = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    prediction = predictor.predict(rgb)
    assert prediction.classes[0] == "plain" and prediction.palette.shape == (7, 3)
    colours = prediction.colorize()
    assert colours.shape == (24, 40, 3) and (colours == prediction.palette[prediction.labels]).all()
    blend = prediction.overlay(alpha=0.5)
    assert (blend == np.round(0.5 * rgb + 0.5 * colours).astype(np.uint8)).all()
    with pytest.raises(ValueError, match="name="):
        prediction.save(tmp_path)
    paths = prediction.save(tmp_path, kinds=("labels", "color", "overlay", "compare"), name="a/b")
    assert np.asarray(Image.open(paths["labels"])).tolist() == prediction.encoded().tolist()
    assert (np.asarray(Image.open(paths["color"]).convert("RGB")) == colours).all()
    assert (np.asarray(Image.open(paths["overlay"])) == blend).all()
    assert Image.open(paths["compare"]).size == (80, 24)
    with pytest.raises(ValueError, match="unknown kind"):
        prediction.save(tmp_path, kinds=("labels", "heatmap"), name="c")


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((8, 8), np.uint8), ValueError, "H x W x 3 uint8"),
    (np.zeros((8, 8, 3), np.float32), ValueError, "dtype float32"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "H x W x 3"),
    (torch.zeros(8, 8, 3), ValueError, "3 x H x W"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), ValueError, "torch.int32"),
    (torch.full((3, 8, 8), 2.0), ValueError, "values 0..1"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "values 0..1"),
    (42, ValueError, "cannot predict a int"),
])
def test_bad_inputs_raise_clear_errors(trained_best, bad, error, message):
    with pytest.raises(error, match=message):
        Predictor.from_checkpoint(trained_best, device="cpu").predict(bad)


def test_unreadable_or_deep_images_are_data_errors(tmp_path, trained_best):
    predictor = Predictor.from_checkpoint(trained_best, device="cpu")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match="broken.jpg: cannot decode image"):
        predictor.predict(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="more than 8 bits"):
        predictor.predict(tmp_path / "deep.png")
    with pytest.raises(DataError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="tta must be"):
        Predictor.from_checkpoint(trained_best, device="cpu", tta=[])


def test_bad_images_in_predict_input_are_one_line_errors(tmp_path, data_root, cli_eval, trained_best):
    for name, write in (("broken.jpg", lambda p: p.write_bytes(b"not a jpeg")),
                        ("deep.png", lambda p: Image.fromarray(np.zeros((8, 8), np.uint16)).save(p))):
        photos = tmp_path / name.split(".")[0]
        photos.mkdir()
        write(photos / name)
        proc = cli_eval([f"checkpoint={trained_best}", f"predict.input={photos}", f"export.dir={tmp_path / name}",
                         f"hydra.run.dir={tmp_path / 'e'}", "eval.scales=null"], data_root, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().count("\n") == 0 and name in proc.stderr


FOLDER = [a for a in TINY if not a.startswith(("dataset=", "++dataset."))]


def test_folder_checkpoint_predicts_after_its_data_root_is_deleted(tmp_path, data_root, cli_train, cli_eval):
    root = make_folder(tmp_path / "mine", classes="classes: [sky, road, car]\npalette: [[0, 0, 255], [128, 64, 128], "
                                                 "[255, 0, 0]]\n", n=4, size=(32, 32))
    run_dir = tmp_path / "run"
    cli_train(["dataset=folder", f"dataset.root={root}", *FOLDER, "train.iters=2", "train.val_every=100",
               f"hydra.run.dir={run_dir}"], data_root)
    shutil.rmtree(root)

    predictor = Predictor.from_checkpoint(run_dir / "last.pt", device="cpu", tta=True)
    assert predictor.label_space.classes == ("sky", "road", "car")
    rgb = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    paths = predictor.predict(rgb).save(tmp_path / "api", name="photo")
    assert sorted(paths) == ["color", "labels", "overlay"] and all(p.is_file() for p in paths.values())
    assert np.asarray(Image.open(paths["labels"])).max() <= 2
    assert {tuple(c) for c in np.asarray(Image.open(paths["color"]).convert("RGB")).reshape(-1, 3)} <= {
        (0, 0, 255), (128, 64, 128), (255, 0, 0)}

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(rgb).save(photos / "photo.png")
    out = tmp_path / "cli"
    cli_eval([f"checkpoint={run_dir / 'last.pt'}", f"predict.input={photos}", f"export.dir={out}",
              f"hydra.run.dir={tmp_path / 'e'}"], data_root)
    for kind in ("labels", "color", "overlay"):
        assert (np.asarray(Image.open(out / kind / "photo.png")) == np.asarray(Image.open(paths[kind]))).all()

    # A checkpoint from before label spaces: a folder dataset's classes cannot be recovered.
    old = torch.load(run_dir / "last.pt", weights_only=True)
    del old["label_space"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="does not record its classes.*no class list"):
        Predictor.from_checkpoint(tmp_path / "old.pt", device="cpu")


def test_older_checkpoints_take_the_built_in_label_space(tmp_path, trained_best):
    saved = torch.load(trained_best, weights_only=True)
    assert LabelSpace.from_dict(saved["label_space"]).submission_values == tuple(range(7))
    del saved["label_space"]
    torch.save(saved, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").label_space is None
    old = Predictor.from_checkpoint(tmp_path / "old.pt", device="cpu")
    new = Predictor.from_checkpoint(trained_best, device="cpu")
    assert old.label_space == new.label_space
    rgb = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    assert (old.predict(rgb).labels == new.predict(rgb).labels).all()
    torch.save(saved["model"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state dict.*segkit-export"):
        Predictor.from_checkpoint(tmp_path / "bare.pt")
