"""The evaluation report as a user looks at it: per_image.jsonl and the confusion matrix recounted
from the exported masks, report/index.html parsed and rendered in headless Chromium, the worst
images kept during the loop, and segkit-report comparing two evaluations."""
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.evaluation.report import (THUMB_SIDE, WorstImages, errors_panel, heatmap_classes, render_report,
                                      top_confusions)


@pytest.fixture(scope="module")
def data_root(shared_data_root):
    return shared_data_root


class Page(HTMLParser):
    """What a reader of the page meets: its text, its pictures, its links and scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.sources: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _dataset(checkpoint):
    from segkit.data import build_dataset
    from segkit.settings import DemoDatasetSettings

    config = torch.load(checkpoint, weights_only=True)["config"]["dataset"]
    return build_dataset(DemoDatasetSettings(**config), "val")


def _recount(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> dict:
    """One image's numbers counted class by class with boolean masks (not through a bincount)."""
    labelled = mask != 255
    ious = {}
    for c in range(num_classes):
        truth, guess = (mask == c) & labelled, (pred == c) & labelled
        union = (truth | guess).sum()
        if union:
            ious[c] = (truth & guess).sum() / union
    worst = min(ious, key=lambda c: (ious[c], c))
    return {"labelled": int(labelled.sum()), "pixAcc": (pred == mask)[labelled].mean(),
            "mIoU": np.mean(list(ious.values())), "classes": sorted(ious), "worst": worst}


@pytest.fixture
def evaluated(tmp_path, data_root, cli_eval, trained_best):
    out = tmp_path / "eval"
    proc = cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={out}", "eval.scales=null",
                     f"export.dir={tmp_path / 'masks'}"], data_root)
    assert "report written to" in proc.stdout
    return out, tmp_path / "masks", _dataset(trained_best)


def test_per_image_numbers_and_confusion_equal_a_recount_of_the_exported_masks(evaluated):
    out, masks, dataset = evaluated
    record = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [dataset.name(i) for i in range(len(dataset))]
    confusion = np.zeros((dataset.num_classes,) * 2, np.int64)
    for i, row in enumerate(rows):
        truth = dataset.load(i)[1]
        pred = np.asarray(Image.open(masks / "labels" / f"{row['name']}.png"))  # the demo's format: train ids
        expected = _recount(pred, truth, dataset.num_classes)
        assert row["labelled"] == expected["labelled"] and row["classes"] == [dataset.classes[c] for c in expected["classes"]]
        assert row["pixAcc"] == pytest.approx(expected["pixAcc"]) and row["mIoU"] == pytest.approx(expected["mIoU"])
        assert row["worst"] == dataset.classes[expected["worst"]]
        keep = truth != 255
        np.add.at(confusion, (truth[keep].astype(int), pred[keep].astype(int)), 1)
    assert record["confusion"] == confusion.tolist()
    assert np.sum(record["confusion"]) == record["labelled_pixels"] == sum(r["labelled"] for r in rows) > 0


def test_report_names_every_class_and_every_picture_exists(evaluated, trained_best):
    out, _, dataset = evaluated
    page = Page((out / "report" / "index.html").read_text())
    text = " ".join(page.text)
    for name in dataset.classes:
        assert name in text
    assert page.sources and all((out / "report" / src).is_file() for src in page.sources)
    assert not page.links  # nothing to fetch: no stylesheet, script or font from elsewhere
    assert "svg" in page.tags and "polyline" in page.tags  # charts, the validation curve among them
    assert str(trained_best) in text and "demo" in text and "predicted as" in text
    # A worst image: image | prediction | truth | errors, side by side at the kept size.
    picture = np.asarray(Image.open(out / "report" / page.sources[0]))
    h, w = dataset.load(0)[0].shape[:2]
    assert picture.shape[0] == h and picture.shape[1] == 4 * w


def test_report_false_skips_the_report_but_not_the_rows(tmp_path, data_root, cli_eval, trained_best):
    out = tmp_path / "eval"
    proc = cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={out}", "eval.scales=null", "eval.report=false"],
                    data_root)
    assert "report written" not in proc.stdout and not (out / "report").exists()
    assert (out / "per_image.jsonl").is_file() and "confusion" in json.loads((out / "metrics.json").read_text())
    bad = cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={tmp_path / 'b'}", "eval.report_worst=-1"],
                   data_root, check=False)
    assert bad.returncode == 2 and "eval.report_worst" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_worst_images_keeps_the_lowest_k_at_thumbnail_size():
    keeper = WorstImages(2)
    big = np.zeros((THUMB_SIDE * 2, THUMB_SIDE * 3), np.uint8)
    for index, miou in enumerate([0.9, 0.2, None, 0.5, 0.2, 0.1]):
        row = {"index": index, "mIoU": miou}
        keeper(row, np.zeros((*big.shape, 3), np.uint8), big, big.astype(np.int64))
    kept = keeper.gathered()
    assert [item[0]["index"] for item in kept] == [5, 1]  # ties: the lower index
    assert all(max(a.shape[:2]) == THUMB_SIDE for item in kept for a in item[1:])
    assert WorstImages(0).gathered() == []


def test_errors_panel_and_the_confusion_summaries():
    image = np.full((1, 3, 3), 200, np.uint8)
    panel = errors_panel(image, np.array([[0, 1, 1]]), np.array([[0, 0, 255]], np.uint8))
    correct, wrong, ignored = panel[0]
    assert wrong[0] > wrong[1] and correct[0] == correct[1] < 200 and ignored[0] == ignored[1] == ignored[2]
    confusion = np.array([[8, 2, 0], [0, 5, 5], [1, 0, 9]])
    lines = top_confusions(confusion, ["a", "b", "c"])
    assert [(c["truth"], c["pred"], c["pixels"]) for c in lines] == [("b", "c", 5), ("a", "b", 2), ("c", "a", 1)]
    assert lines[0]["share"] == 0.5
    many = np.eye(50, dtype=np.int64) * 100
    many[7, 3] = many[45, 46] = 1
    assert heatmap_classes(confusion) == [0, 1, 2]
    chosen = heatmap_classes(many)
    assert len(chosen) == 40 and {3, 7, 45, 46} <= set(chosen) and chosen == sorted(chosen)


def test_a_page_with_more_than_40_classes_maps_40(tmp_path):
    classes = [f"c{i}" for i in range(45)]
    confusion = np.eye(45, dtype=np.int64) * 10
    record = {"confusion": confusion.tolist(), "IoU": dict.fromkeys(classes, 1.0), "acc": dict.fromkeys(classes, 1.0),
              "mIoU": 1.0, "convention": "present", "dataset": "x", "split": "val", "num_images": 1, "seconds": 1.0}
    page = Page(render_report(record, classes, np.zeros((45, 3), np.uint8), [], None))
    assert "the 40 classes with the most wrongly labelled pixels (of 45)" in " ".join(page.text)


def test_segkit_report_compares_two_evaluations(tmp_path, data_root, cli_eval, trained_best, trained_last,
                                                capfd, monkeypatch):
    from segkit.cli import report_main

    for name, ckpt in (("a", trained_last), ("b", trained_best)):
        cli_eval([f"checkpoint={ckpt}", f"hydra.run.dir={tmp_path / name}", "eval.scales=null", "eval.report=false"],
                 data_root)
    monkeypatch.chdir(tmp_path)
    report_main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.json")])
    page = Page((tmp_path / "compare.html").read_text())
    text = " ".join(page.text)
    rows = [json.loads(line) for line in (tmp_path / "a" / "per_image.jsonl").read_text().splitlines()]
    assert all(name in text for name in json.loads((tmp_path / "a" / "metrics.json").read_text())["IoU"])
    assert "changed most" in text and all(r["name"] in text for r in rows)

    other = json.loads((tmp_path / "b" / "metrics.json").read_text())
    other["dataset"] = "ade20k"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text(json.dumps(other))
    for args, message in (([str(tmp_path / "a"), str(tmp_path / "c")], "evaluate different datasets"),
                          ([str(tmp_path / "a"), str(tmp_path / "none")], "no such file")):
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit:
            report_main(args)
        err = capfd.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def _render(page, tmp_path):
    """Headless Chromium's screenshot of ``page`` and the console lines the page logged."""
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return np.asarray(Image.open(shot).convert("RGB")) if shot.exists() else None, console


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_report_renders_in_chromium_without_errors(evaluated, tmp_path):
    out, _, _ = evaluated
    shot, console = _render(out / "report" / "index.html", tmp_path / "r")
    assert shot is not None and console == []
    assert shot.std() > 10 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 20  # text, charts, colours
    # The check sees a script error when there is one.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, console = _render(broken, tmp_path / "b")
    assert any("Uncaught" in line for line in console)
