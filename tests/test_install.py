"""segkit as an installed tool: the wheel carries the configs, and its console scripts train and
evaluate from a directory outside the checkout."""
import os
import subprocess
import sys

import pytest

from train_helpers import ROOT, TINY


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("install")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("segkit-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp / "site"), "SEGKIT_DATA": str(tmp / "data"),
           "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return tmp / "site", work, env


def test_wheel_ships_package_and_configs(installed):
    site, work, env = installed
    out = subprocess.run([sys.executable, "-c", "import segkit, segkit.conf, importlib.resources as r; "
                          "print(segkit.__file__); print(sorted(p.name for p in r.files('segkit.conf').iterdir()))"],
                         cwd=work, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].startswith(str(site))  # not the checkout
    for name in ("train.yaml", "eval.yaml", "dataset", "backbone", "experiment", "eval_preset"):
        assert name in out.stdout
    assert (site / "segkit" / "conf" / "experiment" / "demo.yaml").is_file()


def test_console_scripts_train_and_evaluate_outside_the_checkout(installed):
    site, work, env = installed
    train = subprocess.run([str(site / "bin" / "segkit-train"), "+experiment=demo", *TINY, "train.iters=2",
                            "train.val_every=2", "hydra.run.dir=run"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "run" / "best.pt").is_file() and (site.parent / "data" / "demo" / "demo.json").is_file()
    evaluate = subprocess.run([str(site / "bin" / "segkit-eval"), "checkpoint=run/best.pt", "eval.workers=0",
                               "eval.progress=false", "hydra.run.dir=eval", "export.dir=masks"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert (work / "eval" / "metrics.json").is_file() and len(list((work / "masks" / "labels").glob("*.png"))) == 2
    bad = subprocess.run([str(site / "bin" / "segkit-train"), "train.batch_size=abc"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: train.batch_size: Value 'abc' of type 'str' could not be converted to Integer")
    prepare = subprocess.run([str(site / "bin" / "segkit-prepare"), "--help"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=120)
    assert prepare.returncode == 0 and "pascal_context" in prepare.stdout


def test_user_config_directory_joins_the_packaged_ones(installed, tmp_path):
    site, work, env = installed
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ntrain:\n  seed: 123\n")
    out = subprocess.run([str(site / "bin" / "segkit-train"), f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
                          "+experiment=mine", "--cfg", "job"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seed: 123" in out.stdout
