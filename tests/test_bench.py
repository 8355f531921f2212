"""bench/run.py runs end to end at toy sizes and records what the README's table is built from.

Speed is not asserted here (timed tests on a shared machine only measure the machine); the
benchmark's own output is checked for its structure and for the multi-scale outputs agreeing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_script_writes_its_results(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--backbone", "resnest14", "--size", "64",
           "--classes", "5", "--infer-size", "40", "52", "--base", "48", "--crop", "32", "--rounds", "1",
           "--ms-rounds", "1", "--warmup", "1", "--peak-budget", "0.02", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["train_img_per_s"]) == {"segkit", "segkit_noaux", "peer", "segkit_bf16", "peer_bf16"}
    assert set(results["infer_single_img_per_s"]) == {"segkit", "segkit_plain", "peer", "segkit_bf16",
                                                      "segkit_bf16_conv", "peer_bf16"}
    assert set(results["infer_msflip_s_per_img"]) == {"segkit", "segkit_bf16", "naive", "naive_cl"}
    assert results["msflip_max_batch"] == 8  # auto on CPU for 32x32 windows
    assert results["msflip_vs_naive"]["segkit"]["argmax_agreement"] > 0.999
    assert results["msflip_vs_naive"]["segkit"]["max_abs_diff"] < 1e-4
    # The aux head is the only difference between the stacks' FLOPs: none in a forward pass.
    flops = results["gflops_per_image"]
    assert abs(flops["segkit"]["forward"] - flops["peer"]["forward"]) < 0.01 * flops["peer"]["forward"]
    assert flops["segkit"]["train_step"] > flops["segkit_noaux"]["train_step"]
    assert all(v > 0 for v in results["peak_memory_mb"].values())
    assert "multi-scale + flip, segkit vs naive loop: speed-up" in proc.stdout
    # The machine's limits: CPU flags, measured peaks, every workload against the peak of its precision.
    # Any CPU, with or without bf16 units: each flag recorded as present or not.
    assert isinstance(results["cpu"]["flags"], dict) and isinstance(results["cpu"]["bf16_units"], bool)
    assert "model" in results["cpu"]
    assert {p: set(v) >= {"matmul", "conv", "peak"} for p, v in results["peak_gflops"].items()} == \
        {"fp32": True, "bf16": True}
    rows = results["utilisation"]
    assert {"train segkit", "train peer", "train segkit_ckpt", "train segkit_selective", "infer single segkit", "infer single peer",
            "infer msflip segkit", "infer msflip naive"} <= set(rows)
    assert all(r["gflop_per_s"] > 0 and r["fraction_of_peak"] > 0 and r["vs_peer"] > 0 for r in rows.values())
    assert rows["train peer"]["vs_peer"] == 1 and rows["infer single segkit"]["precision"] == "fp32"
    assert "measured peak bf16: matmul" in proc.stdout and "of peak" in proc.stdout
    # bf16 rows: against the bf16 peak, against segkit in fp32 and the peer in bf16; emulated without units.
    for name in ("train segkit_bf16", "train peer_bf16", "infer single segkit_bf16", "infer single peer_bf16",
                 "infer msflip segkit_bf16"):
        assert rows[name]["precision"] == "bf16" and 0 < rows[name]["fraction_of_conv_peak"]
    assert rows["train peer_bf16"]["vs_peer"] == 1 and rows["infer single peer_bf16"]["vs_peer"] == 1
    assert "single scale images/s: segkit bf16 vs fp32" in proc.stdout
    assert "train images/s: segkit bf16 autocast vs fp32" in proc.stdout
    assert ("emulated" in proc.stdout) == (not results["cpu"]["bf16_units"])
    # The per-layer table: the ten largest ops of a forward in each precision, with their input shapes.
    profile = results["layer_profile"]
    assert set(profile) == {"fp32", "bf16"}
    for ops in profile.values():
        assert len(ops) == 10 and all(op["calls"] >= 1 and op["ms_per_call"] > 0 for op in ops)
        assert [op["total_ms"] for op in ops] == sorted((op["total_ms"] for op in ops), reverse=True)
        assert any("conv" in op["op"] and len(op["input_shapes"]) >= 2 for op in ops)  # image and weight
    assert "largest ops, single-scale forward, segkit bf16" in proc.stdout
    # Activation memory per training image, both precisions; checkpointing keeps a fraction of it.
    memory = results["activation_memory"]["gib_per_image"]
    assert {"segkit", "segkit_selective", "segkit_ckpt", "peer", "peer_ckpt"} <= set(memory)
    for precision in ("fp32", "bf16"):
        assert memory["segkit_ckpt"][precision] < memory["segkit_selective"][precision] < memory["segkit"][precision]
        assert memory["segkit_ckpt"][precision] < 0.5 * memory["segkit"][precision]
        assert memory["segkit"]["bf16"] < 0.6 * memory["segkit"]["fp32"]
    assert set(results["recomputation"]) == {"segkit_selective", "segkit_ckpt"}
    assert all(r["step_time_ratio"] > 0 for r in results["recomputation"].values())
    assert "train.selective_recompute=true: step" in proc.stdout
    assert results["peak_memory_mb"]["segkit_ckpt"] > 0 and results["peak_memory_mb"]["segkit_selective"] > 0
