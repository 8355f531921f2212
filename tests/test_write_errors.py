"""A full disk, huge evaluation sizes and the multi-rank launcher end in one line (issue 23).

A full disk is a real one: a tmpfs of a few MB mounted under the run or export directory (needs
the right to mount, as root in a container; skipped without it). The write errors themselves are
also checked in this process without a mount, each kind of report a writer gives.
"""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from segkit.errors import ConfigError, OutOfResources, WriteError
from segkit.evaluation.evaluator import memory_explained
from segkit.files import append_line, save_atomic, write_atomic, write_dir_atomic, write_failure, write_text_atomic
from segkit.inference.options import InferenceOptions
from segkit.launch import split_option
from segkit.settings import check_eval_sizes
from config_helpers import eval_settings
from data_helpers import make_folder
from train_helpers import ROOT, TINY, env

ZIP_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 5422400 vs 5422288"


# -- a real full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(megabytes, free_kib=None)``: a tmpfs of that size at a new directory, filled
    until ``free_kib`` KiB are left when given; unmounted afterwards."""
    mounted = []

    def mount(megabytes: int, free_kib: int | None = None) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        if free_kib is not None:
            (where / "filler").write_bytes(b"\0" * (megabytes * 1024 - free_kib) * 1024)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def one_error_line(proc, status=2):
    """The one ``error:`` line of a failed command, which has no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == status and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("megabytes,written", [(16, None), (100, 1)], ids=["first-last.pt", "second-last.pt"])
def test_full_disk_during_training_is_one_line_and_keeps_the_files(tmp_path, shared_data_root, cli_train,
                                                                   small_disk, megabytes, written):
    # A TINY checkpoint is about 75 MB: 16 MB take none, 100 MB the first last.pt but not the next.
    run_dir = small_disk(megabytes) / "run"
    proc = cli_train(TINY + ["train.iters=3", "train.ckpt_every=1", "train.val_every=1000",
                             f"hydra.run.dir={run_dir}"], shared_data_root, check=False)
    line = one_error_line(proc)
    assert line.startswith(f"error: cannot write {run_dir / 'last.pt'}: ") and "free" in line, line
    assert not temporaries(run_dir)
    assert (run_dir / "config.yaml").read_text().strip() and (run_dir / "metrics.jsonl").read_text().strip()
    if written is None:
        assert not (run_dir / "last.pt").exists()
    else:  # the earlier last.pt is whole
        assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["iteration"] == written


@pytest.mark.parametrize("where", ["export", "metrics"])
def test_full_disk_during_evaluation_is_one_line(tmp_path, shared_data_root, cli_eval, trained_best, small_disk,
                                                 where):
    disk = small_disk(1, free_kib=4 if where == "export" else 0)  # room for one small PNG, or none
    export, run_dir = (disk / "masks", tmp_path / "e") if where == "export" else (tmp_path / "masks", disk / "e")
    proc = cli_eval([f"checkpoint={trained_best}", f"hydra.run.dir={run_dir}", f"export.dir={export}",
                     "eval.scales=null"], shared_data_root, check=False)
    line = one_error_line(proc)
    if where == "export":
        assert line.startswith(f"error: cannot write {export}/") and ".png: " in line, line
    else:  # the first file evaluation writes there (metrics.json, or its report before it)
        assert line.startswith(f"error: cannot write {run_dir}/") and "needs about" in line, line
    assert "free on its file system" in line and not temporaries(disk)
    if where == "metrics":  # the masks were written; nothing in the run directory is half written
        assert len(list((export / "labels").iterdir())) == 2 and not (run_dir / "metrics.json").exists()


def test_torch_zip_writer_on_a_full_disk(small_disk, monkeypatch):
    # Past the free-space check (a size estimate can fall short), torch.save's own report of the
    # full disk becomes one line too, and the old file stays whole.
    disk = small_disk(1)
    target = disk / "ckpt.pt"
    save_atomic({"w": torch.ones(1000)}, target)
    monkeypatch.setattr("segkit.files.check_free_space", lambda path, needed: None)
    with pytest.raises(WriteError, match=r"came up short \(\[enforce fail at inline_container\.cc") as caught:
        save_atomic({"w": torch.zeros(400_000)}, target)
    assert caught.value.path == target and "free on its file system" in str(caught.value)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1000))
    assert sorted(p.name for p in disk.iterdir()) == ["ckpt.pt"]


# -- the same errors in this process ------------------------------------------------------------
@pytest.mark.parametrize("error,reason", [
    (RuntimeError(ZIP_SHORT_WRITE), "the write came up short ([enforce fail"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.EIO, "Input/output error"), "input/output error"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left"),
])
def test_write_failures_name_the_file_and_keep_the_old_one(tmp_path, error, reason):
    target = tmp_path / "metrics.json"
    write_text_atomic(target, "old")

    def fail(f):
        f.write(b"partial")
        raise error

    with pytest.raises(WriteError) as caught:
        write_atomic(target, fail)
    assert str(caught.value).startswith(f"cannot write {target}: {reason}") and caught.value.__cause__ is error
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_other_errors_keep_their_type_and_directories_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="shape mismatch"):
        write_atomic(tmp_path / "x", lambda f: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    assert write_failure(ValueError("os error 28"), tmp_path) is None and not list(tmp_path.iterdir())

    out = tmp_path / "release"
    write_dir_atomic(out, lambda d: (d / "old.txt").write_text("old"))

    def fill(d):
        write_text_atomic(d / "config.json", "{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "model.safetensors"))

    with pytest.raises(WriteError, match=rf"^cannot write {out / 'model.safetensors'}: no space left"):
        write_dir_atomic(out, fill)
    assert [p.name for p in tmp_path.iterdir()] == ["release"] and (out / "old.txt").read_text() == "old"

    # The free space is checked before a file of known size is written: needed and free are named.
    usage = type("usage", (), {"free": 1000})
    monkeypatch.setattr("segkit.files.shutil.disk_usage", lambda path: usage)
    with pytest.raises(WriteError, match=r"needs about 3\.9 KiB but only 1000 bytes are free"):
        write_text_atomic(out / "config.json", "x" * 4000)
    with pytest.raises(WriteError, match=r"needs about 4\.0 MiB"):
        save_atomic({"w": torch.zeros(1024 * 1024)}, tmp_path / "last.pt")
    with pytest.raises(WriteError, match=r"release: it needs about 1\.0 KiB"):
        write_dir_atomic(out, lambda d: None, size=1024)
    assert not (tmp_path / "last.pt").exists() and not temporaries(tmp_path)


def test_a_short_append_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"iter": 1}')
    write = os.write
    monkeypatch.setattr("segkit.files.os.write", lambda fd, data: write(fd, data[:5]))  # as on a full disk
    with pytest.raises(WriteError, match=r"metrics\.jsonl: only 5 of 13 bytes could be appended"):
        append_line(path, '{"iter": 22}')
    assert path.read_text() == '{"iter": 1}\n'


# -- evaluation sizes ---------------------------------------------------------------------------
def test_eval_scales_and_max_size_are_bounded_by_memory():
    job = eval_settings("dataset=cityscapes")  # 19 classes, base size 1024
    e, d = job.eval, job.dataset
    per_pixel = 4 * (3 + 19)
    check_eval_sizes(e.__class__(**{**vars(e), "scales": [2.0]}), d, per_pixel * 2048 ** 2)  # exactly fits
    with pytest.raises(ConfigError, match=r"eval\.scales=\[2\.0\] is too large: at scale 2 the image's long side "
                                          r"is 2048 px \(ceil\(dataset\.base_size=1024 x 2\)\).*19 classes x 2048 x "
                                          r"2048 float32.*a single scale up to about 2\.00 fits"):
        check_eval_sizes(e.__class__(**{**vars(e), "scales": [2.0]}), d, per_pixel * 2048 ** 2 - 1)
    # Every scale's resized image is held at once: two scales need more than the larger alone.
    with pytest.raises(ConfigError, match=r"eval\.scales=\[2\.0, 1\.0\]"):
        check_eval_sizes(e.__class__(**{**vars(e), "scales": [2.0, 1.0]}), d, per_pixel * 2048 ** 2)
    single = e.__class__(**{**vars(e), "scales": None, "max_size": 1000})
    check_eval_sizes(single, d, per_pixel * 1000 ** 2)
    with pytest.raises(ConfigError, match=r"eval\.max_size=1000 is too large: .* at most about 999 fits"):
        check_eval_sizes(single, d, per_pixel * 1000 ** 2 - 1)
    # The shipped presets fit a 16 GiB machine.
    for name in ("ade20k", "cityscapes", "pascal_context"):
        job = eval_settings(f"dataset={name}")
        check_eval_sizes(job.eval, job.dataset, 16 * 2 ** 30)


def test_eval_scales_1000_is_one_line_before_the_checkpoint_is_read(tmp_path, shared_data_root, cli_eval):
    # The checkpoint does not exist: the scales are refused before it would be read.
    proc = cli_eval([f"checkpoint={tmp_path / 'none.pt'}", "eval.scales=[1000]", f"hydra.run.dir={tmp_path}"],
                    shared_data_root, check=False)
    line = one_error_line(proc)
    assert line.startswith("error: eval.scales=[1000] is too large: at scale 1000 the image's long side is"), line
    assert "GiB of memory" in line and "none.pt" not in line


def test_out_of_memory_while_predicting_names_the_settings():
    job = eval_settings("eval.scales=[0.5,1.0]", "eval.workers=3")
    options = InferenceOptions.from_settings(job.eval)
    with pytest.raises(OutOfResources, match=r"^out of memory \(CUDA out of memory\. Tried to allocate 2\.00 GiB\) "
                                             r"while predicting: fewer or smaller eval\.scales \(now \[0\.5, 1\.0\]\)"
                                             r".*eval\.max_batch \(now auto\).*eval\.workers \(now 3\)"):
        with memory_explained(job, options):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    with pytest.raises(ValueError, match="out of memory"), memory_explained(job, options):
        raise ValueError("out of memory")  # not an allocator's report


# -- the launcher -------------------------------------------------------------------------------
def test_launcher_option_is_read_in_every_spelling():
    assert split_option(["a=1", "--nproc-per-node=2", "b=2"]) == ("2", ["a=1", "b=2"])
    assert split_option(["--nproc_per_node", "4", "a=1"]) == ("4", ["a=1"])
    assert split_option(["a=1"]) == (None, ["a=1"])


def launch(args, data_root, tmp_path):
    """train_seg.py --nproc-per-node=2 in the background, its output to files."""
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_seg.py"), "--nproc-per-node=2", *args], cwd=ROOT,
                                env=env(data_root), stdout=out, stderr=err)
    proc.outputs = tmp_path / "out", tmp_path / "err"
    return proc


def finished(proc, timeout=300):
    proc.wait(timeout)
    out, err = (p.read_text() for p in proc.outputs)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_launcher_bad_batch_size_is_one_line(tmp_path, shared_data_root):
    proc = finished(launch(TINY + ["train.batch_size=3", f"hydra.run.dir={tmp_path / 'r'}"], shared_data_root,
                           tmp_path))
    line = one_error_line(proc)
    assert "train.batch_size=3 (the total over all ranks) must be a positive multiple of 2 ranks" in line, line
    assert "ChildFailedError" not in proc.stderr and "torchelastic" not in proc.stderr


def test_launcher_data_error_on_rank_1_is_one_line_naming_it(tmp_path, shared_data_root):
    root = tmp_path / "mine"
    make_folder(root, counts={"train": 8, "val": 2}, size=(32, 32))
    (root / "images" / "val" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # rank 1's image
    args = [a for a in TINY if "dataset" not in a] + [
        "dataset=folder", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32",
        "train.iters=2", "train.val_every=2", f"hydra.run.dir={tmp_path / 'r'}"]
    proc = finished(launch(args, shared_data_root, tmp_path))
    line = one_error_line(proc)
    assert line.startswith("error: [rank 1] ") and "val/img1.png" in line and "cannot decode image" in line, line
    assert "ChildFailedError" not in proc.stderr and "stopped because rank 1 failed" not in proc.stderr


def test_launcher_sigint_stops_every_rank_with_130(tmp_path, shared_data_root):
    run_dir = tmp_path / "r"
    proc = launch(TINY + ["train.iters=400", "train.val_every=1000", "train.ckpt_every=1000",
                          f"hydra.run.dir={run_dir}"], shared_data_root, tmp_path)
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.outputs[1].read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    result = finished(proc)
    assert result.returncode == 130, result.stderr[-3000:]
    stopped = [line for line in result.stderr.splitlines() if line.startswith("SIGINT: stopped at iteration")]
    assert len(stopped) == 1 and "Traceback" not in result.stderr and "SignalException" not in result.stderr
    assert "error:" not in result.stderr, result.stderr[-3000:]
    saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["iteration"]
    assert f"stopped at iteration {saved} of 400" in stopped[0] and not temporaries(run_dir)
