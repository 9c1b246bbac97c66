#!/usr/bin/env python3
"""GPU facts for the bench summary: nvidia-smi name/memory/driver, the datasheet peak memory
bandwidth for that name, and (with --measure, through PyTorch) a device-to-device copy
bandwidth and a bf16 matmul rate, as METHOD.md asks (measured ceilings beside the datasheet).

    python3 bench/engine/gpuinfo.py [--measure] [--out gpu.json]
"""
from __future__ import annotations

import json
import subprocess
import sys

# Datasheet HBM bandwidth, bytes/s (NVIDIA product pages).
PEAK_BW = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("A800", 2.039e12),
    ("L40S", 0.864e12),
]


def peak_bandwidth(name: str):
    for key, bw in PEAK_BW:
        if key.lower() in name.lower():
            return bw
    return None


def nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # no GPU here
        return dict(error=str(e))
    if not out:
        return dict(error="nvidia-smi printed nothing")
    f = [x.strip() for x in out.splitlines()[0].split(",")]
    return dict(name=f[0], memory_total=f[1], driver=f[2], max_sm_clock=f[3], max_mem_clock=f[4],
                count=len(out.splitlines()))


def measure() -> dict:
    import torch

    res = dict(torch=torch.__version__, cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        return dict(res, error="no CUDA device for torch")
    p = torch.cuda.get_device_properties(0)
    res.update(torch_name=p.name, sms=p.multi_processor_count, total_memory=p.total_memory)
    n = 1 << 30  # 1 GiB per buffer, several buffers so that L2 does not help
    bufs = [torch.randn(n // 4, device="cuda") for _ in range(4)]
    dst = torch.empty_like(bufs[0])
    for b in bufs:
        dst.copy_(b)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    s.record()
    for i in range(reps):
        dst.copy_(bufs[i % 4])
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / reps
    res["copy_bw_bytes_per_s"] = 2 * n / (ms / 1e3)  # read + write
    del bufs, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    s.record()
    for _ in range(10):
        a @ b
    e.record()
    torch.cuda.synchronize()
    res["bf16_matmul_tflops"] = 2 * 8192 ** 3 / (s.elapsed_time(e) / 10 / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return res


def main(argv) -> int:
    info = nvidia_smi()
    info["peak_bw_bytes_per_s"] = peak_bandwidth(info.get("name", ""))
    if "--measure" in argv:
        try:
            info["measured"] = measure()
        except Exception as e:
            info["measured"] = dict(error=f"{type(e).__name__}: {e}")
    txt = json.dumps(info, indent=1)
    if "--out" in argv:
        open(argv[argv.index("--out") + 1], "w").write(txt)
    print(txt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
