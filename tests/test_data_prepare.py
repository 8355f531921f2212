"""segkit.data.prepare on tiny archives: local path, loopback HTTP, resume, checksum, Cityscapes."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_ade, make_cityscapes, serve, zip_tree
from segkit.data import ADE20KDataset, CityscapesDataset
from segkit.data import prepare
from segkit.data.base import read_mask
from segkit.data.cityscapes import LABEL_ID_LUT

ADE_COUNTS = ["--expect-counts", "2,1"]


@pytest.fixture(scope="module")
def ade_zip(tmp_path_factory):
    src = make_ade(tmp_path_factory.mktemp("ade_src"), {"training": 2, "validation": 1})
    archive = zip_tree(src, tmp_path_factory.mktemp("ade_zip") / "ADEChallengeData2016.zip",
                       "ADEChallengeData2016")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def error_line(capsys) -> str:
    """The last stderr line (progress bars come before it)."""
    return capsys.readouterr().err.rstrip("\n").split("\n")[-1]


def run_ade(root, url, *extra):
    return prepare.main(["ade20k", "--root", str(root), "--url", str(url), *ADE_COUNTS, *extra])


def test_ade20k_from_local_path_and_file_url(tmp_path, ade_zip):
    archive, sha = ade_zip
    assert run_ade(tmp_path / "a", archive, "--sha256", sha) == 0
    assert len(ADE20KDataset(tmp_path / "a", "training")) == 2
    assert not (tmp_path / "a" / archive.name).exists()  # a local archive is used in place
    assert run_ade(tmp_path / "b", archive.as_uri(), "--sha256", sha) == 0
    assert len(ADE20KDataset(tmp_path / "b", "validation")) == 1
    assert run_ade(tmp_path / "b", archive.as_uri(), "--sha256", sha) == 0  # already prepared


def test_ade20k_known_digest_table_is_checked(tmp_path, ade_zip, capsys):
    archive, _ = ade_zip
    assert run_ade(tmp_path, archive) == 2  # our tiny archive is not the official file
    err = error_line(capsys)
    assert err.startswith("error: ") and "sha1" in err and prepare.KNOWN_FILES[archive.name]["sha1"] in err
    assert archive.exists()  # the user's own file is never deleted
    assert not (tmp_path / "ADEChallengeData2016").exists()


def test_ade20k_counts_are_checked(tmp_path, ade_zip, capsys):
    archive, sha = ade_zip
    assert prepare.main(["ade20k", "--root", str(tmp_path), "--url", str(archive), "--sha256", sha]) == 2
    err = error_line(capsys)
    assert "training: 2 images / 2 labels, expected 20210" in err and "--no-expect-counts" in err
    assert prepare.main(["ade20k", "--root", str(tmp_path), "--url", str(archive), "--no-expect-counts"]) == 0


def test_ade20k_http_download(tmp_path, ade_zip):
    archive, sha = ade_zip
    with serve(archive.parent) as (url, ranges):
        assert run_ade(tmp_path, f"{url}/{archive.name}", "--sha256", sha) == 0
    assert ranges == []
    assert (tmp_path / archive.name).read_bytes() == archive.read_bytes()
    assert len(ADE20KDataset(tmp_path, "training")) == 2


def test_ade20k_resumes_a_partial_download(tmp_path, ade_zip):
    archive, sha = ade_zip
    data = archive.read_bytes()
    (tmp_path / f"{archive.name}.part").write_bytes(data[:1000])
    with serve(archive.parent) as (url, ranges):
        assert run_ade(tmp_path, f"{url}/{archive.name}", "--sha256", sha) == 0
    assert ranges == ["bytes=1000-"]
    assert (tmp_path / archive.name).read_bytes() == data


def test_ade20k_interrupted_download_resumes_on_rerun(tmp_path, ade_zip, capsys):
    archive, sha = ade_zip
    with serve(archive.parent, cut_after=1500) as (url, _):
        assert run_ade(tmp_path, f"{url}/{archive.name}", "--sha256", sha) == 2
    assert "run the same command again to resume" in error_line(capsys)
    assert (tmp_path / f"{archive.name}.part").stat().st_size == 1500
    with serve(archive.parent) as (url, ranges):
        assert run_ade(tmp_path, f"{url}/{archive.name}", "--sha256", sha) == 0
    assert ranges == ["bytes=1500-"]
    assert (tmp_path / archive.name).read_bytes() == archive.read_bytes()


def test_ade20k_hash_mismatch_deletes_the_download(tmp_path, ade_zip, capsys):
    archive, _ = ade_zip
    with serve(archive.parent) as (url, _):
        assert run_ade(tmp_path, f"{url}/{archive.name}", "--sha256", "0" * 64) == 2
    err = error_line(capsys)
    assert "sha256" in err and "0" * 64 in err and "deleted" in err
    assert list(tmp_path.iterdir()) == []


def test_ade20k_http_errors(tmp_path, ade_zip, capsys):
    archive, _ = ade_zip
    with serve(archive.parent) as (url, _):
        assert run_ade(tmp_path, f"{url}/missing.zip") == 2
    assert "HTTP 404" in error_line(capsys)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segkit.data.prepare", "ade20k", "--root", str(tmp_path),
         "--url", str(tmp_path / "nope.zip")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: archive {tmp_path / 'nope.zip'} does not exist"]


@pytest.fixture
def cityscapes_archives(tmp_path):
    src = make_cityscapes(tmp_path / "src", {"train": 2, "val": 1, "test": 1})
    root = tmp_path / "cityscapes"
    root.mkdir()
    zip_tree(src, root / "leftImg8bit_trainvaltest.zip", "leftImg8bit")
    zip_tree(src, root / "gtFine_trainvaltest.zip", "gtFine")
    return root


def test_cityscapes_extracts_and_writes_train_ids(cityscapes_archives, capsys):
    root = cityscapes_archives
    args = ["cityscapes", "--root", str(root), "--expect-counts", "2,1", "--workers", "2"]
    assert prepare.main(args) == 0
    label_ids = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png"))
    assert len(label_ids) == 4
    for path in label_ids:
        train_ids = path.with_name(path.name.replace("labelIds", "labelTrainIds"))
        assert np.array_equal(read_mask(train_ids), LABEL_ID_LUT[read_mask(path)])
    assert CityscapesDataset(root, "train").samples[0].mask.name.endswith("labelTrainIds.png")
    capsys.readouterr()
    assert prepare.main(args) == 0  # rerun: layout found, nothing left to convert
    assert "0 converted now" in capsys.readouterr().out


def test_cityscapes_checks(cityscapes_archives, capsys):
    root = cityscapes_archives
    (root / "gtFine_trainvaltest.zip").unlink()
    assert prepare.main(["cityscapes", "--root", str(root), "--no-expect-counts"]) == 2
    assert "gtFine_trainvaltest.zip" in error_line(capsys)
    make_cityscapes(root, {"train": 1})  # an extracted layout instead of the archive
    assert prepare.main(["cityscapes", "--root", str(root)]) == 2  # official counts by default
    assert "train: 2 images / 1 labels, expected 2975" in error_line(capsys)
    assert prepare.main(["cityscapes", "--root", str(root / "absent")]) == 2
    assert "cityscapes-dataset.com" in error_line(capsys)
