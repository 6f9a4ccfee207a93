"""The GPU variant (under 5 minutes): tokens/s and MFU of `small` training in bf16 on CUDA.

Measures the GPU's bf16 matmul throughput, then times optimizer steps of the `small` preset
(eager and compiled) exactly as bench/training.py does on the CPU. Without a CUDA device it
says so and exits 0, so `make bench` runs it everywhere.

    python bench/gpu.py --out bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import time_steps  # noqa: E402

from openllm.fileio import write_json  # noqa: E402
from openllm.perf import mfu, peak_matmul_flops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences of 1,024 tokens per step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return
    device = "cuda"
    name = torch.cuda.get_device_name(0)
    peak = peak_matmul_flops(torch.bfloat16, device=device, sizes=(4096, 8192), seconds=2.0)
    print(f"{name}: bf16 matmul {peak / 1e12:,.1f} TFLOP/s", flush=True)
    rows = []
    for compiled in (False, True):
        row = time_steps("small", "bf16", compiled, args.steps, device, batch=args.batch)
        row["mfu_vs_bf16_peak"] = mfu(row["tokens_per_second"], row["flops_per_token"], peak)
        rows.append(row)
        print(f"small bf16 compiled={compiled!s:5} {row['tokens_per_second']:>10,.0f} tok/s  "
              f"MFU {row['mfu_vs_bf16_peak']:.1%}", flush=True)
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "peak_bf16_flops": peak, "runs": rows, "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, result, sort_keys=False)  # keep the order the report prints


if __name__ == "__main__":
    main()
