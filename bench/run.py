#!/usr/bin/env python
"""segkit against the peer stack, measured in one process and one run.

Peer: segmentation-models-pytorch's DeepLabV3 on timm's ResNeSt (``tu-resnest*``) at the same output
stride; for multi-scale + flip, also the naive loop (one forward per scale, flip and window).
Timings are interleaved (A B, then B A, ...) after warm-up, and medians are reported, so drift on a
shared machine hits both sides alike. Examples:

    python bench/run.py --device cpu --backbone resnest50 --size 256 --batch 2
    python bench/run.py --device cuda --backbone resnest101 --size 512 --batch 8 --amp bf16 --channels-last
    python bench/run.py --predictor-only        # segkit.Predictor vs the evaluator, single image 512x683
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from naive import naive_multiscale  # noqa: E402
from segkit.engine.inference import predict_multiscale, predict_single, prepare_model, resolve_max_batch  # noqa: E402,E501
from segkit.losses import SegmentationLoss  # noqa: E402
from segkit.models.resnest import create_backbone  # noqa: E402
from segkit.models.segmentor import Segmentor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMM_NAMES = {"resnest14": "resnest14d", "resnest26": "resnest26d", "resnest50": "resnest50d",
              "resnest101": "resnest101e", "resnest200": "resnest200e", "resnest269": "resnest269e",
              "resnet50d": "resnet50d", "resnet101d": "resnet101d"}
ADE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PeerDeepLabV3(nn.Module):
    """smp's DeepLabV3 on timm's ResNeSt, answering in segkit's ``{"out": logits}`` contract."""

    def __init__(self, backbone: str, classes: int, output_stride: int) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp
        self.net = smp.DeepLabV3(encoder_name=f"tu-{TIMM_NAMES[backbone]}", encoder_weights=None,
                                 encoder_output_stride=output_stride, classes=classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


STACKS = ("segkit", "segkit_noaux", "peer")


def build(stack: str, args: argparse.Namespace) -> nn.Module:
    """``segkit``: the recipe's model (with the aux FCN head); ``segkit_noaux``: the same without
    it, which is smp's DeepLabV3 layout; ``peer``: smp on timm."""
    torch.manual_seed(0)
    if stack.startswith("segkit"):
        model = Segmentor(create_backbone(args.backbone, output_stride=args.output_stride), args.classes,
                          aux=stack == "segkit")
    else:
        model = PeerDeepLabV3(args.backbone, args.classes, args.output_stride)
    model = model.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return torch.compile(model) if args.compile else model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Times per call, alternating the order every round (A B, B A, ...) after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device))
    return times


def train_step(model: nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=gen).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = SegmentationLoss(aux_weight=0.2)
    scaler = torch.amp.GradScaler(args.device, enabled=args.amp == "fp16")
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=AMP.get(args.amp, torch.float32), enabled=args.amp is not None):
            loss, _ = criterion(model(images), masks)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def flops_per_image(model: nn.Module, args: argparse.Namespace, train: bool) -> float:
    # Two images: timm's split attention cannot train on one (its BN after the pool sees one value).
    x = torch.randn(2, 3, args.size, args.size, device=args.device)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            sum(v.float().mean() for v in out.values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def matmul_peak_tflops(device: str) -> float | None:
    """Measured bf16 matmul throughput of this GPU (the denominator of the utilisation figure)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(20)]
    return 2 * 8192**3 / statistics.median(times) / 1e12


def peak_memory_mb(stack: str, args: argparse.Namespace) -> float:
    """Peak memory of training steps: CUDA max allocated here; on CPU the peak RSS of a fresh process."""
    if args.device == "cuda":
        model = build(stack, args)
        step = train_step(model, args)
        step()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() / 2**20
        del model, step
        torch.cuda.empty_cache()
        return peak
    cmd = [sys.executable, __file__, "--peak-rss-child", stack, *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def loader_images_per_s(args: argparse.Namespace) -> float:
    """The ADE20K training pipeline (base 520, crop 480, scale 0.5-2, flip) over the demo scenes on disk."""
    from segkit.data import build_dataset
    from segkit.data.transforms import build_train_transform
    cfg = {"name": "demo", "root": str(args.data), "ignore_index": 255, "base_size": 520,
           "crop_size": 480, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "train_split": "training", "val_split": "validation"}
    dataset = build_dataset(cfg, "train", build_train_transform(cfg, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=args.workers,
                                         drop_last=True, persistent_workers=True)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for _ in range(min(args.loader_batches, len(loader) - 1)):
        seen += next(batches)[0].shape[0]
    return seen / (time.perf_counter() - start)


def measure_inference(seg: nn.Module, peer: nn.Module, args: argparse.Namespace) -> dict:
    """Single-scale images/s (segkit vs peer) and multi-scale + flip s/image (segkit vs naive loop).

    "segkit" is the model as eval_seg.py runs it by default (BatchNorm folded, channels_last);
    "segkit_plain" is the same weights unchanged, NCHW, as the peer and the naive loop run;
    "segkit_compiled" (``--eval-compile``) adds eval.compile=true.
    """
    results: dict = {}
    h, w = args.infer_size
    image = torch.randn(3, h, w, generator=torch.Generator().manual_seed(2)).to(args.device)
    seg.eval()  # in eval mode the aux head is idle: segkit and segkit_noaux are the same network
    peer.eval()
    prepared = prepare_model(copy.deepcopy(seg), args.device)

    def compiled() -> nn.Module:
        # Dynamo's shape history is per function, not per model: without a reset, the multi-scale
        # windows would follow the single-scale image's shape into a slower dynamic-shape graph.
        torch._dynamo.reset()
        return prepare_model(copy.deepcopy(seg), args.device, compile=True)

    variants = {"segkit": prepared, "segkit_plain": seg, "peer": peer}
    if args.eval_compile:
        variants["segkit_compiled"] = compiled()
    single = {s: (lambda m=m: predict_single(m, image, pad_multiple=args.output_stride, autocast=args.amp))
              for s, m in variants.items()}
    t = interleave(single, args.rounds, 1, args.device)
    results["infer_single_img_per_s"] = {s: 1 / statistics.median(v) for s, v in t.items()}

    # "naive_cl" (the naive loop on a channels_last copy) isolates what batching alone buys.
    seg_cl = copy.deepcopy(seg).to(memory_format=torch.channels_last)
    variants = {"segkit": prepared, **({"segkit_compiled": compiled()} if args.eval_compile else {})}
    max_batch = results["msflip_max_batch"] = resolve_max_batch(args.max_batch, args.crop, args.device)
    ms = {s: (lambda m=m: predict_multiscale(m, image, ADE_SCALES, True, args.base, args.crop, args.classes,
                                             max_batch=max_batch, autocast=args.amp))
          for s, m in variants.items()}
    ms["naive"] = lambda: naive_multiscale(seg, image, ADE_SCALES, True, args.base, args.crop, args.classes)
    ms["naive_cl"] = lambda: naive_multiscale(seg_cl, image, ADE_SCALES, True, args.base, args.crop, args.classes)
    t = interleave(ms, args.ms_rounds, 1, args.device)
    results["infer_msflip_s_per_img"] = {s: statistics.median(v) for s, v in t.items()}
    naive = ms["naive"]()
    results["msflip_vs_naive"] = {}
    for s in ms:
        if s.startswith("segkit"):
            out = ms[s]()
            results["msflip_vs_naive"][s] = {"max_abs_diff": (out - naive).abs().max().item(),
                                             "argmax_agreement": (out.argmax(0) == naive.argmax(0)).float().mean().item()}
    return results


class _OneImage:
    """One unlabelled image in segkit's dataset contract, for :func:`evaluate`."""

    def __init__(self, image, num_classes: int) -> None:
        self.image, self.num_classes, self.ignore_index = image, num_classes, 255

    def __len__(self) -> int:
        return 1

    def load(self, index: int):
        return self.image, None


def measure_predictor(seg: nn.Module, args: argparse.Namespace) -> dict:
    """Seconds per image at a single scale: ``segkit.Predictor.predict`` on an H x W x 3 uint8 array
    vs the evaluator's path (:func:`evaluate` on a one-image dataset, as eval_seg.py runs it); the
    same prepared model (BatchNorm folded, channels_last)."""
    from segkit.data.base import bit_palette
    from segkit.data.label_space import LabelSpace
    from segkit.engine.inference import evaluate
    from segkit.predictor import Predictor

    h, w = args.infer_size
    image = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8).numpy()
    space = LabelSpace("bench", tuple(f"class{i}" for i in range(args.classes)),
                       tuple(map(tuple, bit_palette(args.classes).tolist())), tuple(range(args.classes)), 255,
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), args.base, args.crop, None)
    model = prepare_model(copy.deepcopy(seg).eval(), args.device)
    predictor = Predictor(model, space, device=args.device, output_stride=args.output_stride, autocast=args.amp)
    fns = {"predictor": lambda: predictor.predict(image),
           "evaluator": lambda: evaluate(model, _OneImage(image, args.classes), preprocess=space.preprocess,
                                         pad_multiple=args.output_stride, autocast=args.amp, device=args.device,
                                         num_workers=0, progress=False)}
    t = interleave(fns, args.rounds, 1, args.device)
    return {s: statistics.median(v) for s, v in t.items()}


def predictor_row(results: dict) -> str:
    t = results["predictor_single_s_per_img"]
    return (f"{'Predictor single image s: predictor vs evaluator':48s} {t['predictor']:10.3f} {t['evaluator']:10.3f} "
            f"{t['predictor'] / t['evaluator']:8.3f}")


def run(args: argparse.Namespace) -> dict:
    results: dict = {}
    models = {s: build(s, args) for s in STACKS}

    t = interleave({s: train_step(m, args) for s, m in models.items()}, args.rounds, args.warmup, args.device)
    results["train_step_s_median"] = {s: statistics.median(v) for s, v in t.items()}
    results["train_img_per_s"] = {s: args.batch / v for s, v in results["train_step_s_median"].items()}

    results.update(measure_inference(models["segkit"], models["peer"], args))
    results["predictor_single_s_per_img"] = measure_predictor(models["segkit"], args)

    results["gflops_per_image"] = {s: {"forward": flops_per_image(m, args, False) / 1e9,
                                       "train_step": flops_per_image(m, args, True) / 1e9}
                                   for s, m in models.items()}
    peak = matmul_peak_tflops(args.device)
    if peak:
        results["bf16_matmul_peak_tflops"] = peak
        results["train_fraction_of_peak"] = {
            s: results["gflops_per_image"][s]["train_step"] * results["train_img_per_s"][s] / 1e3 / peak
            for s in models}
    del models
    results["peak_memory_mb"] = {s: peak_memory_mb(s, args) for s in STACKS}
    if args.data:
        results["loader_img_per_s"] = loader_images_per_s(args)
    return results


def table(results: dict) -> str:
    def row(label: str, key: str, a: str, b: str) -> str:
        x, y = results[key][a], results[key][b]
        return f"{label:48s} {x:10.3f} {y:10.3f} {x / y:8.3f}"

    single, ms = results["infer_single_img_per_s"], results["infer_msflip_s_per_img"]
    lines = [f"{'metric (A vs B)':48s} {'A':>10s} {'B':>10s} {'A/B':>8s}",
             row("train images/s: segkit vs peer", "train_img_per_s", "segkit", "peer"),
             row("train images/s: segkit without aux vs peer", "train_img_per_s", "segkit_noaux", "peer"),
             row("inference images/s, single scale: segkit vs peer", "infer_single_img_per_s", "segkit", "peer"),
             row("  segkit plain (NCHW, BN not folded) vs peer", "infer_single_img_per_s", "segkit_plain", "peer")]
    if "segkit_compiled" in single:
        lines.append(row("  segkit eval.compile=true vs peer", "infer_single_img_per_s", "segkit_compiled", "peer"))
    lines.append(predictor_row(results))
    lines += [row("multi-scale + flip s/image: segkit vs naive", "infer_msflip_s_per_img", "segkit", "naive"),
              row("  segkit vs naive loop in channels_last", "infer_msflip_s_per_img", "segkit", "naive_cl")]
    if "segkit_compiled" in ms:
        lines.append(row("  segkit eval.compile=true vs naive", "infer_msflip_s_per_img", "segkit_compiled", "naive"))
    lines += [row("peak train memory MB: segkit vs peer", "peak_memory_mb", "segkit", "peer"),
              row("peak train memory MB: without aux vs peer", "peak_memory_mb", "segkit_noaux", "peer")]
    g = results["gflops_per_image"]
    for kind in ("forward", "train_step"):
        x, y = g["segkit"][kind], g["peer"][kind]
        lines.append(f"{'GFLOPs/image ' + kind + ': segkit vs peer':48s} {x:10.1f} {y:10.1f} {x / y:8.3f}")
    for variant, agree in results["msflip_vs_naive"].items():
        lines.append(f"multi-scale + flip, {variant} vs naive loop: speed-up {ms['naive'] / ms[variant]:.2f}x, "
                     f"max |diff| {agree['max_abs_diff']:.1e}, argmax agreement {agree['argmax_agreement']:.4%} "
                     f"({results['msflip_max_batch']} windows per forward)")
    if "train_fraction_of_peak" in results:
        f = results["train_fraction_of_peak"]
        lines.append(f"training step at {f['segkit']:.1%} (segkit) / {f['peer']:.1%} (peer) of the measured "
                     f"bf16 matmul peak {results['bf16_matmul_peak_tflops']:.0f} TFLOP/s")
    if "loader_img_per_s" in results:
        lines.append(f"data loader, ADE20K recipe on demo images, {results['settings']['workers']} workers: "
                     f"{results['loader_img_per_s']:.1f} images/s")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnest50", choices=sorted(TIMM_NAMES))
    p.add_argument("--output-stride", type=int, default=8, choices=(8, 16))
    p.add_argument("--size", type=int, default=256, help="training crop (square)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", choices=sorted(AMP))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (training and inference)")
    p.add_argument("--eval-compile", action="store_true",
                   help="also time segkit's inference with eval.compile=true (compiles for about a minute)")
    p.add_argument("--infer-size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"),
                   help="inference image (ADE20K-sized by default)")
    p.add_argument("--base", type=int, default=520, help="multi-scale base size (ADE20K: 520)")
    p.add_argument("--crop", type=int, default=480, help="multi-scale window (ADE20K: 480)")
    p.add_argument("--max-batch", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="windows per forward in segkit's multi-scale + flip (eval.max_batch; default auto)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ms-rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", type=Path, help="demo data root for the loader benchmark (generated if absent)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=10)
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/<device>-<backbone>-<time>.json)")
    p.add_argument("--predictor-only", action="store_true",
                   help="measure only segkit.Predictor against the evaluator's single-scale path")
    p.add_argument("--peak-rss-child", choices=STACKS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.peak_rss_child:  # a fresh process: its peak RSS is this stack's alone
        step = train_step(build(args.peak_rss_child, args), args)
        for _ in range(2):
            step()
        # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak across exec.
        hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(hwm_kb / 1024)
        return
    if args.predictor_only:
        results = {"predictor_single_s_per_img": measure_predictor(build("segkit", args), args)}
        print(predictor_row(results))
        return
    import segmentation_models_pytorch as smp
    import timm
    results = run(args)
    settings = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items() if k not in ("peak_rss_child", "out")}
    results = {"device": device_name(args.device), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "versions": {"torch": torch.__version__, "timm": timm.__version__, "smp": smp.__version__,
                            "python": platform.python_version()},
               "settings": settings, **results}
    print(table(results))
    out = args.out or ROOT / "bench" / "results" / f"{args.device}-{args.backbone}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
