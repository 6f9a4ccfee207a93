"""Training throughput and model FLOPs utilisation (MFU), against matmul peaks measured in the same run.

For each model preset, precision (fp32 / bf16 autocast) and compile setting, times AdamW
optimizer steps of the real model on random tokens (data loading is not the bottleneck at
this size); then the default training as params.yaml's defaults configure it (preset,
optimizer, precision, compile on this machine). Reports tokens/s and MFU = tokens/s x
FLOPs/token / peak FLOP/s, for both the bf16 and the fp32 matmul peak of this machine.
MFU counts model FLOPs only, so Muon's own matrix work is overhead it has to pay for.

    python bench/training.py --out bench/results/training.json [--presets micro tiny small] [--steps 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from openllm.config import MODEL_PRESETS, load_params
from openllm.fileio import write_json
from openllm.model import GPT, GPTConfig
from openllm.perf import mfu, peak_matmul_flops
from openllm.perf import cpu_name
from openllm.device import DeviceSetup, resolve_device, set_deterministic
from openllm.optim import build_optimizer
from openllm.train import train_step

VOCAB = {"micro": 4096, "tiny": 4096, "small": 32000}
BATCH = {"micro": 8, "tiny": 8, "small": 4}  # sequences per step: the default for micro and tiny, memory-friendly for small


def time_steps(preset: str, precision: str, compiled: bool, steps: int, device: str, batch: int | None = None,
               optimizer_kind: str = "adamw", deterministic: bool = True) -> dict:
    """Tokens/s of the train stage's own optimizer step (openllm.train.train_step)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each row compiles under its own settings
    set_deterministic(deterministic)
    config = GPTConfig(vocab_size=VOCAB[preset], **MODEL_PRESETS[preset])
    model = GPT(config).to(device).train()
    optimizer = build_optimizer(model, optimizer_kind, 1e-3, 0.1, (0.9, 0.95))
    forward = torch.compile(model) if compiled else model
    batch, context = batch or BATCH[preset], config.context_length
    tokens = torch.randint(0, config.vocab_size, (batch, context + 1), device=device)
    setup = DeviceSetup(torch.device(device), torch.bfloat16 if precision == "bf16" else None, compiled)

    def step() -> None:
        train_step(forward, model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], 1e-3, 1.0, setup)

    started = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "preset": preset, "precision": precision, "compiled": compiled, "optimizer": optimizer_kind,
        "deterministic": deterministic,
        "parameters": model.num_parameters(),
        "tokens_per_step": batch * context, "tokens_per_second": batch * context * steps / seconds,
        "flops_per_token": model.estimate_flops_per_token(), "warmup_seconds": warmup_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/training.json"))
    parser.add_argument("--presets", nargs="+", default=["micro", "tiny", "small"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    peaks = {name: peak_matmul_flops(dtype, device=args.device) for name, dtype in
             (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(f"matmul peak on {args.device}: bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s")
    # The default training: what `dvc repro` runs with params.yaml as shipped, on this machine.
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    setup = resolve_device(params.train.device, params.train.precision, params.train.compile, distributed=False)
    default = (params.model.preset, setup.precision_name, setup.compile, params.train.optimizer, True)
    configs = [(preset, precision, compiled, "adamw", True) for preset in args.presets
               for precision in ("fp32", "bf16") for compiled in (False, True)]
    # the default once more without train.deterministic: what bit-identical reruns cost
    rows = []
    for config in configs + [default, default[:4] + (False,)]:
        preset, precision, compiled, optimizer_kind, deterministic = config
        row = time_steps(preset, precision, compiled, args.steps, args.device, optimizer_kind=optimizer_kind,
                         deterministic=deterministic)
        row["default"] = config == default
        achieved = row["tokens_per_second"] * row["flops_per_token"]
        row |= {"mfu_vs_bf16_peak": mfu(row["tokens_per_second"], row["flops_per_token"], peaks["bf16"]),
                "mfu_vs_fp32_peak": mfu(row["tokens_per_second"], row["flops_per_token"], peaks["fp32"]),
                "model_gflops_per_second": achieved / 1e9}
        rows.append(row)
        print(f"{preset:5} {precision} compiled={compiled!s:5} {optimizer_kind:5} deterministic={deterministic!s:5} "
              f"{row['tokens_per_second']:9,.0f} tok/s  "
              f"MFU {row['mfu_vs_bf16_peak']:6.1%} of bf16 peak, {row['mfu_vs_fp32_peak']:6.1%} of fp32 peak")
    result = {"device": args.device, "machine": cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "peak_flops": peaks, "runs": rows, "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, result, sort_keys=False)  # keep the order the report prints


if __name__ == "__main__":
    main()
