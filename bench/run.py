#!/usr/bin/env python
"""segkit against the peer stack, measured in one process and one run.

Peer: segmentation-models-pytorch's DeepLabV3 on timm's ResNeSt (``tu-resnest*``) at the same output
stride; for multi-scale + flip, also the naive loop (one forward per scale, flip and window).
Timings are interleaved (A B, then B A, ...) after warm-up, and medians are reported, so drift on a
shared machine hits both sides alike.

Against the machine's limits: the run records the CPU model and its bf16 flags, measures the
fp32 and bf16 peaks of a matmul and of a large 3x3 conv on this device, and reports every
workload's achieved GFLOP/s (FlopCounterMode FLOPs / median time) as a fraction of the peak of its
precision. Activation memory per training image (bench/memory.py) is measured for segkit and the
peer, in fp32 and under bf16 autocast, with and without recomputation (segkit's selective
recomputation and full checkpointing, timm's stage checkpointing).

bf16 rows (left out with ``--no-bf16``): segkit with ``eval.dtype=bf16`` (``prepare_model(..., InferenceOptions(
dtype="bf16"))``) and the peer under bf16 autocast at inference, both stacks' training steps under
bf16 autocast (``train.amp=bf16``), each against segkit in fp32 and as a fraction of the bf16 peak;
"segkit_bf16_conv" is eval.dtype=bf16 with the ASPP's dilated convolutions left to oneDNN (what
segkit.models.dilated replaces). On a CPU without bf16 units they are labelled emulated. A
per-layer table (torch.profiler, ``record_shapes``) lists the ten largest ops of a single-scale
forward in each precision, with their input shapes. Examples:

    python bench/run.py --device cpu --backbone resnest50 --size 256 --batch 2 \
        --memory-backbone resnest101 --memory-size 512
    python bench/run.py --device cpu --backbone resnest50 --size 256 --batch 2 --amp bf16
    python bench/run.py --device cuda --backbone resnest101 --size 512 --batch 8 --amp bf16 --channels-last
    python bench/run.py --predictor-only        # segkit.Predictor vs the evaluator, single image 512x683
    python bench/run.py --no-naive --rounds 5 --ms-rounds 2   # the bf16 targets without the naive loop
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from memory import training_forward_bytes  # noqa: E402
from naive import naive_multiscale  # noqa: E402
from segkit.heap import keep_freed_memory  # noqa: E402
from segkit.inference.multiscale import predict_multiscale, predict_single, resolve_max_batch  # noqa: E402
from segkit.inference.options import InferenceOptions  # noqa: E402
from segkit.inference.prepare import prepare_model  # noqa: E402
from segkit.models.dilated import DilatedConv2d  # noqa: E402
from segkit.training.losses import SegmentationLoss  # noqa: E402
from segkit.models.resnest import create_backbone  # noqa: E402
from segkit.models.segmentor import Segmentor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMM_NAMES = {"resnest14": "resnest14d", "resnest26": "resnest26d", "resnest50": "resnest50d",
              "resnest101": "resnest101e", "resnest200": "resnest200e", "resnest269": "resnest269e",
              "resnet50d": "resnet50d", "resnet101d": "resnet101d"}
ADE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp32": torch.float32, **AMP}
#: /proc/cpuinfo flags that decide what bf16 costs on a CPU (oneDNN uses the first two for bf16 math).
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512f", "avx2")


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
#: Training steps under bf16 autocast (train.amp=bf16), each of the stack it names.
BF16_STACKS = {"segkit_bf16": "segkit", "peer_bf16": "peer"}
#: Also timed in training, reported as the cost of their recomputation rather than as stacks:
#: the recipe's model with train.selective_recompute=true / train.grad_checkpointing=true.
SELECTIVE, CHECKPOINTED = "segkit_selective", "segkit_ckpt"
RECOMPUTED = {SELECTIVE: "selective", CHECKPOINTED: "full"}


def new_model(stack: str, backbone: str, classes: int, output_stride: int) -> nn.Module:
    """``segkit``: the recipe's model (with the aux FCN head); ``segkit_noaux``: the same without
    it, which is smp's DeepLabV3 layout; ``segkit_selective`` / ``segkit_ckpt``: the recipe's model
    with ``train.selective_recompute=true`` / ``train.grad_checkpointing=true``; ``peer``: smp on
    timm (``peer_ckpt``: with timm's own checkpointing of the encoder stages)."""
    stack = BF16_STACKS.get(stack, stack)
    if stack.startswith("segkit"):
        model = Segmentor(create_backbone(backbone, output_stride=output_stride), classes,
                          aux=stack != "segkit_noaux")
        model.set_grad_checkpointing(stack == CHECKPOINTED)
        model.set_selective_recompute(stack == SELECTIVE)
        return model
    model = PeerDeepLabV3(backbone, classes, output_stride)
    model.net.encoder.model.set_grad_checkpointing(stack == "peer_ckpt")
    return model


def build(stack: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = new_model(stack, args.backbone, args.classes, args.output_stride)
    model = model.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return torch.compile(model) if args.compile else model


def criterion_for(stack: str) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """segkit's loss for segkit (main + 0.2 x aux cross-entropy); PyTorch's cross-entropy for the
    peer, as an smp user trains it."""
    if stack.startswith("segkit"):
        loss = SegmentationLoss(aux_weight=0.2)
        return lambda out, masks: loss(out, masks)[0]
    return lambda out, masks: F.cross_entropy(out["out"], masks, ignore_index=255)


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


def stack_amp(stack: str, args: argparse.Namespace) -> str | None:
    """The autocast a stack trains under: bf16 for :data:`BF16_STACKS`, ``--amp`` for the others."""
    return "bf16" if stack in BF16_STACKS else args.amp


def train_step(model: nn.Module, stack: str, args: argparse.Namespace) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=gen).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = criterion_for(stack)
    amp = stack_amp(stack, args)
    scaler = torch.amp.GradScaler(args.device, enabled=amp == "fp16")
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=AMP.get(amp, torch.float32), enabled=amp is not None):
            loss = criterion(model(images), masks)
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


def _fastest(fn: Callable[[], object], device: str) -> float:
    """Seconds of the fastest of three calls after one warm-up (a peak is a best case)."""
    fn()
    return min(timed(fn, device) for _ in range(3))


def peak_gflops(device: str, dtype: torch.dtype, budget: float) -> dict:
    """Best measured GFLOP/s of a square matmul (n = 256 .. 2048; up to 8192 on a GPU) and of a 3x3
    conv 512->512 (8x8 .. 64x64, NCHW or channels_last; batch 8 on a GPU). Sizes grow until a call
    takes longer than ``budget`` seconds, so that an emulated precision finishes too."""
    gpu = device == "cuda"
    result: dict = {"matmul": 0.0, "conv": 0.0}
    for n in (256, 512, 1024, 2048, 4096, 8192)[:6 if gpu else 4]:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        seconds = _fastest(lambda: a @ b, device)
        if 2 * n**3 / seconds / 1e9 > result["matmul"]:
            result["matmul"], result["matmul_size"] = 2 * n**3 / seconds / 1e9, n
        if seconds > budget:
            break
    batch = 8 if gpu else 1
    for hw in (8, 16, 32, 64):
        flops = 2 * batch * 512 * 512 * 9 * hw * hw
        slowest = 0.0
        for layout, name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
            x = torch.randn(batch, 512, hw, hw, device=device).to(dtype).contiguous(memory_format=layout)
            w = torch.randn(512, 512, 3, 3, device=device).to(dtype).contiguous(memory_format=layout)
            seconds = _fastest(lambda: F.conv2d(x, w, padding=1), device)
            if flops / seconds / 1e9 > result["conv"]:
                result.update(conv=flops / seconds / 1e9, conv_size=hw, conv_layout=name)
            slowest = max(slowest, seconds)
        if slowest > budget:
            break
    result["peak"] = max(result["matmul"], result["conv"])
    return result


def cpu_info() -> dict:
    """The CPU model, whether it has the flags bf16 speed depends on, and whether oneDNN uses bf16."""
    info: dict = {"model": platform.processor() or "unknown", "flags": {}}
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        info["model"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        info["flags"] = {f: f in flags for f in CPU_FLAGS}
    except (OSError, StopIteration):
        pass
    info["bf16_units"] = bool(info["flags"].get("avx512_bf16") or info["flags"].get("amx_bf16"))
    info["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return info


def peak_memory_mb(stack: str, args: argparse.Namespace) -> float:
    """Peak memory of training steps: CUDA max allocated here; on CPU the peak RSS of a fresh process."""
    if args.device == "cuda":
        model = build(stack, args)
        step = train_step(model, stack, args)
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


def counted_gflop(fn: Callable[[], object]) -> float:
    """GFLOPs FlopCounterMode counts in ``fn``, run on fake tensors (shapes only, nothing computed)."""
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def window_forwards(image: torch.Tensor, args: argparse.Namespace) -> int:
    """How many crop x crop windows multi-scale + flip runs through the model for ``image``."""
    windows = 0

    def stub(x: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal windows
        windows += x.shape[0]
        return {"out": x.new_zeros(x.shape[0], args.classes, *x.shape[-2:])}

    predict_multiscale(stub, image, InferenceOptions(scales=ADE_SCALES, flip=True, max_batch=8), base_size=args.base,
                       crop_size=args.crop, num_classes=args.classes)
    return windows


def bf16_variants(seg: nn.Module, args: argparse.Namespace) -> dict[str, nn.Module]:
    """segkit with eval.dtype=bf16, and the same with the ASPP's dilated convolutions forced back to
    oneDNN's convolution ("segkit_bf16_conv", the form :mod:`segkit.models.dilated` replaces)."""
    if args.no_bf16:
        return {}
    variants = {}
    for name, form in (("segkit_bf16", None), ("segkit_bf16_conv", False)):
        model = prepare_model(copy.deepcopy(seg), args.device, InferenceOptions(dtype="bf16"))
        for m in model.modules():
            if isinstance(m, DilatedConv2d):
                m.tap_gemm = form
        variants[name] = model
    return variants


def variant_autocast(variant: str, args: argparse.Namespace) -> str | None:
    """eval.dtype=bf16 variants run without autocast, the peer's bf16 row under bf16 autocast, the rest
    under ``--amp``."""
    if variant.startswith("segkit_bf16"):
        return None
    return "bf16" if variant == "peer_bf16" else args.amp


def measure_inference(seg: nn.Module, peer: nn.Module, args: argparse.Namespace) -> dict:
    """Single-scale images/s (segkit vs peer) and multi-scale + flip s/image (segkit vs naive loop).

    "segkit" is the model as eval_seg.py runs it by default (BatchNorm folded, channels_last);
    "segkit_plain" is the same weights unchanged, NCHW, as the peer and the naive loop run;
    "segkit_compiled" (``--eval-compile``) adds eval.compile=true; "segkit_bf16" is eval.dtype=bf16
    (weights cast once after folding, no autocast), "peer_bf16" the peer under bf16 autocast (see
    :func:`bf16_variants`). The others run under ``--amp``; the naive loop runs in float32 whatever
    ``--amp`` says.
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
        return prepare_model(copy.deepcopy(seg), args.device, InferenceOptions(compile=True))

    bf16 = bf16_variants(seg, args)
    variants = {"segkit": prepared, "segkit_plain": seg, "peer": peer, **bf16,
                **({} if args.no_bf16 else {"peer_bf16": peer})}
    if args.eval_compile:
        variants["segkit_compiled"] = compiled()
    single = {s: (lambda m=m, s=s: predict_single(m, image, pad_multiple=args.output_stride,
                                                  amp=variant_autocast(s, args)))
              for s, m in variants.items()}
    t = interleave(single, args.rounds, 1, args.device)
    results["infer_single_img_per_s"] = {s: 1 / statistics.median(v) for s, v in t.items()}
    results["layer_profile"] = {precision: layer_profile(single[s], args.profile_top)
                                for precision, s in (("fp32", "segkit"), ("bf16", "segkit_bf16")) if s in single}

    # "naive_cl" (the naive loop on a channels_last copy) isolates what batching alone buys.
    seg_cl = copy.deepcopy(seg).to(memory_format=torch.channels_last)
    variants = {"segkit": prepared, **({"segkit_bf16": bf16["segkit_bf16"]} if bf16 else {}),
                **({"segkit_compiled": compiled()} if args.eval_compile else {})}
    max_batch = results["msflip_max_batch"] = resolve_max_batch(args.max_batch, args.crop, args.device)
    msflip = InferenceOptions(scales=ADE_SCALES, flip=True, max_batch=max_batch)
    ms = {s: (lambda m=m, s=s: predict_multiscale(m, image, msflip.replace(amp=variant_autocast(s, args)),
                                                  base_size=args.base, crop_size=args.crop, num_classes=args.classes))
          for s, m in variants.items()}
    if not args.no_naive:
        ms["naive"] = lambda: naive_multiscale(seg, image, ADE_SCALES, True, args.base, args.crop, args.classes)
        ms["naive_cl"] = lambda: naive_multiscale(seg_cl, image, ADE_SCALES, True, args.base, args.crop, args.classes)
    t = interleave(ms, args.ms_rounds, 1, args.device)
    results["infer_msflip_s_per_img"] = {s: statistics.median(v) for s, v in t.items()}
    # Agreement with the naive loop, or with segkit in fp32 without it (--no-naive).
    reference = results["msflip_reference"] = "segkit" if args.no_naive else "naive"
    expected = ms[reference]()
    results[f"msflip_vs_{reference}"] = {}
    for s in ms:
        if s.startswith("segkit") and s != reference:
            out = ms[s]()
            results[f"msflip_vs_{reference}"][s] = {
                "max_abs_diff": (out - expected).abs().max().item(),
                "argmax_agreement": (out.argmax(0) == expected.argmax(0)).float().mean().item()}

    crop = torch.zeros(1, 3, args.crop, args.crop, device=args.device)
    results["gflop_per_call"] = {
        "single": {s: counted_gflop(lambda m=m: predict_single(m, image, pad_multiple=args.output_stride))
                   for s, m in (("segkit", seg), ("peer", peer))},
        "msflip": window_forwards(image, args) * counted_gflop(lambda: seg(crop))}
    return results


def layer_profile(fn: Callable[[], object], top: int) -> list[dict]:
    """The ``top`` ops of one call of ``fn`` (after a warm-up call) by self time, grouped by op and input
    shapes (torch.profiler, ``record_shapes``): calls, total and per-call milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "input_shapes": [list(s) for s in e.input_shapes if s], "calls": e.count,
             "total_ms": e.self_cpu_time_total / 1e3, "ms_per_call": e.self_cpu_time_total / 1e3 / e.count}
            for e in events[:top]]


def utilisation(results: dict, args: argparse.Namespace) -> dict:
    """Achieved GFLOP/s of every timed workload, its fraction of the measured peak of its
    precision (the better of matmul and conv), and its speed against the peer in the same run."""
    amp = args.amp or "fp32"
    peaks = results["peak_gflops"]
    g, train = results["gflops_per_image"], results["train_img_per_s"]
    single, ms = results["infer_single_img_per_s"], results["infer_msflip_s_per_img"]
    rows = {}

    def add(name: str, gflops: float, precision: str, vs_peer: float) -> None:
        rows[name] = {"gflop_per_s": gflops, "precision": precision,
                      "fraction_of_peak": gflops / peaks[precision]["peak"],
                      "fraction_of_conv_peak": gflops / peaks[precision]["conv"], "vs_peer": vs_peer}

    for s in STACKS:
        add(f"train {s}", g[s]["train_step"] * train[s], amp, train[s] / train["peer"])
    for s, base in BF16_STACKS.items():
        if s in train:
            add(f"train {s}", g[base]["train_step"] * train[s], "bf16", train[s] / train["peer_bf16"])
    # Useful FLOPs only: the recomputation is the cost of the memory saved, not work done.
    for s, r in results["recomputation"].items():
        add(f"train {s}", g["segkit"]["train_step"] * args.batch / r["step_s"], amp,
            args.batch / r["step_s"] / train["peer"])
    flops = results["gflop_per_call"]
    for s, rate in single.items():
        bf16 = s.startswith("segkit_bf16") or s == "peer_bf16"
        add(f"infer single {s}", flops["single"]["peer" if s.startswith("peer") else "segkit"] * rate,
            "bf16" if bf16 else amp, rate / single["peer_bf16" if bf16 else "peer"])
    for s, seconds in ms.items():
        add(f"infer msflip {s}", flops["msflip"] / seconds,
            "bf16" if s == "segkit_bf16" else "fp32" if s.startswith("naive") else amp,
            ms[results["msflip_reference"]] / seconds)
    return rows


def activation_memory(args: argparse.Namespace) -> dict:
    """Bytes saved for backward per training image (bench/memory.py), fp32 and bf16 autocast."""
    stacks = ("segkit", SELECTIVE, CHECKPOINTED, "segkit_noaux", "peer", "peer_ckpt")
    gib: dict = {s: {} for s in stacks}
    params: dict = {s: {} for s in stacks}
    for stack in stacks:
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            saved = training_forward_bytes(
                lambda: new_model(stack, args.memory_backbone, args.classes, args.output_stride),
                criterion_for(stack), args.memory_batch, args.memory_size, args.classes,
                amp=AMP.get(precision), fake=not args.memory_real)
            gib[stack][precision] = saved.total / args.memory_batch / 2**30
            params[stack][precision] = saved.parameters / args.memory_batch / 2**30
    return {"backbone": args.memory_backbone, "size": args.memory_size, "batch": args.memory_batch,
            "fake_tensors": not args.memory_real, "gib_per_image": gib, "parameters_gib_per_image": params,
            "vs_peer": {s: {p: gib[s][p] / gib["peer"][p] for p in gib[s]} for s in stacks}}


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
    from segkit.evaluation.loop import evaluate
    from segkit.inference.predictor import Predictor

    h, w = args.infer_size
    image = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8).numpy()
    space = LabelSpace("bench", tuple(f"class{i}" for i in range(args.classes)),
                       tuple(map(tuple, bit_palette(args.classes).tolist())), tuple(range(args.classes)), 255,
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), args.base, args.crop, None)
    model = prepare_model(copy.deepcopy(seg).eval(), args.device)
    options = InferenceOptions(amp=args.amp)
    predictor = Predictor(model, space, device=args.device, output_stride=args.output_stride, options=options)
    fns = {"predictor": lambda: predictor.predict(image),
           "evaluator": lambda: evaluate(model, _OneImage(image, args.classes), options, preprocess=space.preprocess,
                                         pad_multiple=args.output_stride, device=args.device, num_workers=0,
                                         progress=False)}
    t = interleave(fns, args.rounds, 1, args.device)
    return {s: statistics.median(v) for s, v in t.items()}


def predictor_row(results: dict) -> str:
    t = results["predictor_single_s_per_img"]
    return (f"{'Predictor single image s: predictor vs evaluator':48s} {t['predictor']:10.3f} {t['evaluator']:10.3f} "
            f"{t['predictor'] / t['evaluator']:8.3f}")


def run(args: argparse.Namespace) -> dict:
    results: dict = {"cpu": cpu_info()}
    precisions = dict.fromkeys(("fp32", "bf16", args.amp or "fp32"))
    results["peak_gflops"] = {p: peak_gflops(args.device, DTYPES[p], args.peak_budget) for p in precisions}
    models = {s: build(s, args) for s in (*STACKS, *RECOMPUTED, *(() if args.no_bf16 else BF16_STACKS))}

    t = interleave({s: train_step(m, s, args) for s, m in models.items()}, args.rounds, args.warmup, args.device)
    step_s = {s: statistics.median(v) for s, v in t.items()}
    recomputed = {s: step_s.pop(s) for s in RECOMPUTED}
    results["recomputation"] = {s: {"step_s": v, "step_time_ratio": v / step_s["segkit"]} for s, v in recomputed.items()}
    results["train_step_s_median"] = step_s
    results["train_img_per_s"] = {s: args.batch / v for s, v in step_s.items()}
    for s in (*RECOMPUTED, *BF16_STACKS):
        models.pop(s, None)

    results.update(measure_inference(models["segkit"], models["peer"], args))
    results["predictor_single_s_per_img"] = measure_predictor(models["segkit"], args)

    results["gflops_per_image"] = {s: {"forward": flops_per_image(m, args, False) / 1e9,
                                       "train_step": flops_per_image(m, args, True) / 1e9}
                                   for s, m in models.items()}
    results["utilisation"] = utilisation(results, args)
    if args.device == "cuda":
        peak = results["bf16_matmul_peak_tflops"] = results["peak_gflops"]["bf16"]["matmul"] / 1e3
        results["train_fraction_of_peak"] = {
            s: results["gflops_per_image"][s]["train_step"] * results["train_img_per_s"][s] / 1e3 / peak
            for s in models}
    del models
    results["peak_memory_mb"] = {s: peak_memory_mb(s, args) for s in (*STACKS, *RECOMPUTED)}
    results["activation_memory"] = activation_memory(args)
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
    if "naive" in ms:
        lines += [row("multi-scale + flip s/image: segkit vs naive", "infer_msflip_s_per_img", "segkit", "naive"),
                  row("  segkit vs naive loop in channels_last", "infer_msflip_s_per_img", "segkit", "naive_cl")]
    if "segkit_compiled" in ms and "naive" in ms:
        lines.append(row("  segkit eval.compile=true vs naive", "infer_msflip_s_per_img", "segkit_compiled", "naive"))
    lines += bf16_rows(results, row)
    lines += [row("peak train memory MB: segkit vs peer", "peak_memory_mb", "segkit", "peer"),
              row("peak train memory MB: without aux vs peer", "peak_memory_mb", "segkit_noaux", "peer"),
              row("peak train memory MB: selective recompute vs peer", "peak_memory_mb", SELECTIVE, "peer"),
              row("peak train memory MB: checkpointed vs peer", "peak_memory_mb", CHECKPOINTED, "peer")]
    g = results["gflops_per_image"]
    for kind in ("forward", "train_step"):
        x, y = g["segkit"][kind], g["peer"][kind]
        lines.append(f"{'GFLOPs/image ' + kind + ': segkit vs peer':48s} {x:10.1f} {y:10.1f} {x / y:8.3f}")
    reference = results["msflip_reference"]
    for variant, agree in results[f"msflip_vs_{reference}"].items():
        against = "naive loop" if reference == "naive" else "segkit fp32"
        lines.append(f"multi-scale + flip, {variant} vs {against}: speed-up {ms[reference] / ms[variant]:.2f}x, "
                     f"max |diff| {agree['max_abs_diff']:.1e}, argmax agreement {agree['argmax_agreement']:.4%} "
                     f"({results['msflip_max_batch']} windows per forward)")
    for s, r in results["recomputation"].items():
        option = "selective_recompute" if RECOMPUTED[s] == "selective" else "grad_checkpointing"
        lines.append(f"train.{option}=true: step {r['step_s']:.3f} s vs {results['train_step_s_median']['segkit']:.3f} s "
                     f"({r['step_time_ratio']:.2f}x the step time)")
    if "train_fraction_of_peak" in results:
        f = results["train_fraction_of_peak"]
        lines.append(f"training step at {f['segkit']:.1%} (segkit) / {f['peer']:.1%} (peer) of the measured "
                     f"bf16 matmul peak {results['bf16_matmul_peak_tflops']:.0f} TFLOP/s")
    if "loader_img_per_s" in results:
        lines.append(f"data loader, ADE20K recipe on demo images, {results['settings']['workers']} workers: "
                     f"{results['loader_img_per_s']:.1f} images/s")
    return "\n".join(lines + ["", limits_table(results), "", layer_table(results), "",
                              memory_table(results["activation_memory"])])


def bf16_rows(results: dict, row: Callable[[str, str, str, str], str]) -> list[str]:
    """segkit's bf16 rows against segkit in fp32 and against the peer in bf16 (A/B of images/s, or
    of seconds fp32 over bf16: the speed-up either way)."""
    if "segkit_bf16" not in results["infer_single_img_per_s"]:
        return []
    emulated = "" if results["cpu"]["bf16_units"] else " (emulated: no bf16 units)"
    return [f"bf16{emulated}: eval.dtype=bf16 (inference), train.amp=bf16 (training)",
            row("  single scale images/s: segkit bf16 vs fp32", "infer_single_img_per_s", "segkit_bf16", "segkit"),
            row("  single scale images/s: segkit bf16 vs peer bf16", "infer_single_img_per_s", "segkit_bf16",
                "peer_bf16"),
            row("  single scale: bf16 vs bf16 with oneDNN's ASPP", "infer_single_img_per_s", "segkit_bf16",
                "segkit_bf16_conv"),
            row("  multi-scale + flip s/image: segkit fp32 vs bf16", "infer_msflip_s_per_img", "segkit", "segkit_bf16"),
            row("  train images/s: segkit bf16 autocast vs fp32", "train_img_per_s", "segkit_bf16", "segkit"),
            row("  train images/s: segkit bf16 vs peer bf16", "train_img_per_s", "segkit_bf16", "peer_bf16")]


def layer_table(results: dict) -> str:
    """The largest ops of a single-scale forward of segkit (as eval_seg.py prepares it) per precision."""
    lines = []
    emulated = "" if results["cpu"]["bf16_units"] else ", emulated: no bf16 units"
    for precision, ops in results["layer_profile"].items():
        lines.append(f"largest ops, single-scale forward, segkit {precision}"
                     f"{emulated if precision == 'bf16' else ''} (self CPU time, grouped by input shapes)")
        lines.append(f"  {'op':34s} {'calls':>5s} {'ms/call':>9s} {'total ms':>9s}  input shapes")
        for op in ops:
            shapes = " ".join("x".join(map(str, shape)) for shape in op["input_shapes"])
            lines.append(f"  {op['op']:34s} {op['calls']:5d} {op['ms_per_call']:9.2f} {op['total_ms']:9.1f}  {shapes}")
    return "\n".join(lines)


def limits_table(results: dict) -> str:
    cpu = results["cpu"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    lines = [f"CPU: {cpu['model']} ({flags}; oneDNN bf16: {'yes' if cpu['onednn_bf16'] else 'no'})"]
    if not cpu["bf16_units"]:
        lines.append("  no bf16 units (avx512_bf16 / amx_bf16): bf16 is emulated on this CPU, bf16 speed is not "
                     "representative; keep fp32")
    for precision, p in results["peak_gflops"].items():
        lines.append(f"measured peak {precision}: matmul {p['matmul']:.1f} GFLOP/s ({p['matmul_size']}^2), "
                     f"conv 3x3 512->512 {p['conv']:.1f} GFLOP/s ({p['conv_size']}x{p['conv_size']}, "
                     f"{p['conv_layout']})")
    lines.append(f"{'workload':40s} {'precision':>15s} {'GFLOP/s':>9s} {'of peak':>8s} {'of conv':>8s} {'vs peer':>8s}")
    for name, r in results["utilisation"].items():
        precision = r["precision"] + (" (emulated)" if r["precision"] == "bf16" and not cpu["bf16_units"] else "")
        lines.append(f"{name:40s} {precision:>15s} {r['gflop_per_s']:9.1f} {r['fraction_of_peak']:8.1%} "
                     f"{r['fraction_of_conv_peak']:8.1%} {r['vs_peer']:7.2f}x")
    lines.append("(of peak: the better of the matmul and conv peaks of the precision; of conv: the 3x3 conv peak. "
                 "vs peer: training and single scale against smp/timm (bf16 rows against the peer in bf16), "
                 "multi-scale + flip against the naive loop (segkit fp32 with --no-naive); training with recomputation counts its useful FLOPs "
                 "only; the FLOPs are the plain convolutions', taps in the padding included)")
    return "\n".join(lines)


def memory_table(memory: dict) -> str:
    lines = [f"activation memory per training image, GiB (saved for backward, {memory['backbone']} "
             f"{memory['size']}x{memory['size']}, batch {memory['batch']}, "
             f"{'fake tensors' if memory['fake_tensors'] else 'real run'}; ratio to the peer without checkpointing)",
             f"{'stack':20s} {'fp32':>8s} {'ratio':>7s} {'bf16':>8s} {'ratio':>7s}"]
    for stack, gib in memory["gib_per_image"].items():
        ratio = memory["vs_peer"][stack]
        lines.append(f"{stack:20s} {gib['fp32']:8.3f} {ratio['fp32']:7.3f} {gib['bf16']:8.3f} {ratio['bf16']:7.3f}")
    return "\n".join(lines)


def device_name(device: str, cpu: dict) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu['model']} ({torch.get_num_threads()} threads)"


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
    p.add_argument("--no-bf16", action="store_true",
                   help="leave out the bf16 rows (eval.dtype=bf16, bf16 autocast training, the bf16 layer table)")
    p.add_argument("--profile-top", type=int, default=10, help="ops in the per-layer table of each precision")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (training and inference)")
    p.add_argument("--eval-compile", action="store_true",
                   help="also time segkit's inference with eval.compile=true (compiles for about a minute)")
    p.add_argument("--infer-size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"),
                   help="inference image (ADE20K-sized by default)")
    p.add_argument("--base", type=int, default=520, help="multi-scale base size (ADE20K: 520)")
    p.add_argument("--crop", type=int, default=480, help="multi-scale window (ADE20K: 480)")
    p.add_argument("--max-batch", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="windows per forward in segkit's multi-scale + flip (eval.max_batch; default auto)")
    p.add_argument("--no-naive", action="store_true",
                   help="leave out the naive multi-scale loop (the slowest part); multi-scale rows against segkit fp32")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="CPU: keep freed memory in the process (train/eval.keep_freed_memory, every stack) or "
                        "glibc's default of fresh pages per large block")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ms-rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", type=Path, help="demo data root for the loader benchmark (generated if absent)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=10)
    p.add_argument("--peak-budget", type=float, default=0.25,
                   help="seconds per call up to which the matmul / conv peaks grow their size")
    p.add_argument("--memory-backbone", choices=sorted(TIMM_NAMES), help="default: --backbone")
    p.add_argument("--memory-size", type=int, help="default: --size")
    p.add_argument("--memory-batch", type=int, help="default: --batch")
    p.add_argument("--memory-real", action="store_true",
                   help="measure activation memory on real tensors (default: fake tensors, same bytes, no compute)")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/<device>-<backbone>-<time>.json)")
    p.add_argument("--predictor-only", action="store_true",
                   help="measure only segkit.Predictor against the evaluator's single-scale path")
    p.add_argument("--peak-rss-child", choices=(*STACKS, *RECOMPUTED), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.memory_backbone = args.memory_backbone or args.backbone
    args.memory_size = args.memory_size or args.size
    args.memory_batch = args.memory_batch or args.batch
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu" and args.malloc == "keep":  # as train_seg.py / eval_seg.py do by default
        keep_freed_memory()
    if args.peak_rss_child:  # a fresh process: its peak RSS is this stack's alone
        step = train_step(build(args.peak_rss_child, args), args.peak_rss_child, args)
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
    results = {"device": device_name(args.device, results["cpu"]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
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
