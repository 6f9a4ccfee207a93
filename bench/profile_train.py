"""Where a training step of the default model spends its time, by phase and by kind of work.

    python bench/profile_train.py --out bench/results/profile_train.json [--steps 30]

The model, batch, optimizer and precision are params.yaml's (the default ``micro`` model, 8 x 256
tokens, Muon, bf16 autocast on CPU), on random tokens. Three measurements in one run:

- phases: forward with the loss, backward, then gradient clipping plus the optimizer step,
  timed apart over ``--steps`` eager steps, and the compiled ``train_step`` of the train stage;
- kinds of work: PyTorch's profiler over eager forward and backward passes, each operator's own
  time put in one group: the output head (operators on a vocabulary-wide tensor: its matmul, the
  softmax and the cross-entropy), attention, the other matmuls, and everything else
  (norms, rotary, activations, copies). The profiler adds a fixed cost to every operator, which
  inflates the many small ones of "everything else"; the unprofiled forward and backward time is
  recorded beside it;
- the matmul peak of this machine (bf16), to give each phase's share of it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from openllm.config import load_params
from openllm.device import resolve_device, set_deterministic
from openllm.fileio import write_json
from openllm.model import GPT, GPTConfig
from openllm.optim import build_optimizer
from openllm.perf import cpu_name, peak_matmul_flops
from openllm.train import train_step

VOCAB = 4096
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def kind(name: str, shapes: list, vocab: int) -> str:
    """The group of one profiled operator (see the module docstring)."""
    if any(vocab in shape for shape in shapes if isinstance(shape, (list, tuple))):
        return "output head"
    if "attention" in name or "scaled_dot_product" in name:
        return "attention"
    return "other matmuls" if name in MATMULS else "everything else"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_train.json"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    setup = resolve_device(params.train.device, params.train.precision, params.train.compile, distributed=False)
    set_deterministic(True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, **params.model.resolved())).train()
    optimizer = build_optimizer(model, params.train.optimizer, 1e-3, 0.1, (0.9, 0.95))
    batch, context = params.train.batch_size, model.config.context_length
    tokens = torch.randint(0, VOCAB, (batch, context + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    phases = dict.fromkeys(("forward and loss", "backward", "clip and optimizer"), 0.0)
    for step in range(args.steps + 2):  # two warm-up steps
        marks = [time.perf_counter()]
        with setup.autocast():
            loss = F.cross_entropy(model(x, use_cache=False)[0].flatten(0, 1).float(), y.flatten())
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for name, start, end in zip(phases, marks, marks[1:]):
            phases[name] += (end - start) / args.steps if step >= 2 else 0.0
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(5):
            with setup.autocast():
                loss = F.cross_entropy(model(x, use_cache=False)[0].flatten(0, 1).float(), y.flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
    kinds: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        group = kind(event.key, event.input_shapes or [], VOCAB)
        kinds[group] = kinds.get(group, 0.0) + event.self_cpu_time_total / 1e6 / 5
    compiled = torch.compile(model) if setup.compile else model
    for _ in range(3):  # compile, warm up
        train_step(compiled, model, optimizer, [(x, y)], 1e-3, 1.0, setup)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(compiled, model, optimizer, [(x, y)], 1e-3, 1.0, setup)
    step_seconds = (time.perf_counter() - started) / args.steps
    peak = peak_matmul_flops(torch.bfloat16)
    flops = model.estimate_flops_per_token() * batch * context
    result = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "preset": params.model.preset, "tokens_per_step": batch * context, "optimizer": params.train.optimizer,
              "precision": setup.precision_name, "eager_phase_seconds": phases,
              "eager_forward_backward_seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
              "eager_forward_backward_seconds_unprofiled": phases["forward and loss"] + phases["backward"],
              "compiled": setup.compile, "train_step_seconds": step_seconds,
              "model_flops_per_step": flops, "bf16_peak_flops": peak, "mfu_train_step": flops / step_seconds / peak,
              "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, result, sort_keys=False)
    total = sum(phases.values())
    for name, seconds in phases.items():
        print(f"{name:20} {1000 * seconds:7.1f} ms ({seconds / total:.0%} of an eager step)")
    for name, seconds in result["eager_forward_backward_seconds_by_kind"].items():
        print(f"{name:20} {1000 * seconds:7.1f} ms of forward and backward (profiled)")
    print(f"train_step ({'compiled' if setup.compile else 'eager'}): {1000 * step_seconds:.1f} ms, "
          f"{result['mfu_train_step']:.1%} of the bf16 matmul peak ({peak / 1e9:,.0f} GFLOP/s) -> {args.out}")


if __name__ == "__main__":
    main()
