"""A character-level GPT in the style of nanoGPT's Shakespeare recipe, as a quality baseline.

Learned absolute positions, LayerNorm, GELU MLP, one token per character: the usual first
model people train, initialised and regularised as nanoGPT does (weights N(0, 0.02), the residual
projections scaled by 1/sqrt(2 x layers), zero biases, weight decay on matrices only).
``train_for(seconds)`` trains it on the same split OpenLLM uses for a fixed wall-clock budget;
``train_recipe`` trains it the way nanoGPT's README runs it on a CPU (this shape, batch 12, 2,000
iterations, learning rate 1e-3 decaying to 1e-4), timed; ``bits_per_byte`` scores either the same
way OpenLLM is scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from openllm.fileio import iter_documents
from openllm.scoring import language_metrics, score_windows


@dataclass
class CharConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context: int = 64
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100


class CharBlock(nn.Module):
    def __init__(self, cfg: CharConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, cfg: CharConfig, vocab_size: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, cfg.n_embd)
        self.position = nn.Embedding(cfg.context, cfg.n_embd)
        self.blocks = nn.Sequential(*[CharBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.head.weight = self.token.weight
        self.apply(self._init)
        for block in self.blocks:  # the two projections into the residual stream, scaled down by depth
            for layer in (block.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        """nanoGPT's initialisation: N(0, 0.02) weights and embeddings, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.token(idx) + self.position(positions))))


class CharData:
    """Characters of the training text as ids; unseen validation characters share one id."""

    def __init__(self, train_text: str):
        chars = sorted(set(train_text))
        self.index = {c: i + 1 for i, c in enumerate(chars)}  # 0 = unseen character
        self.vocab_size = len(chars) + 1
        self.train = self.encode(train_text)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self.index.get(c, 0) for c in text), dtype=np.int64, count=len(text))


NANOGPT_ITERATIONS = 2000  # nanoGPT README, "baby GPT" on a CPU: --max_iters=2000 --lr_decay_iters=2000


def train_for(seconds: float, train_text: str, cfg: CharConfig = CharConfig(), seed: int = 1337,
              total_steps: int | None = None) -> tuple[CharGPT, CharData, int]:
    """Train until ``seconds`` of wall-clock time have passed (or ``total_steps`` steps are done);
    return the model and the steps taken.

    After the warmup, the learning rate follows a cosine down to the minimum at ``total_steps``;
    by default at the number of steps that fit in ``seconds`` (estimated from the speed of the
    first 50 steps), so the baseline gets a schedule fitted to its budget, as OpenLLM's own
    training does.
    """
    torch.manual_seed(seed)
    data = CharData(train_text)
    model = CharGPT(cfg, data.vocab_size)
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on these only, as nanoGPT does
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    started, step = time.perf_counter(), 0
    planned = total_steps or 10**9
    while time.perf_counter() - started < seconds and step < planned:
        if total_steps is None and step == 50:
            planned = int(50 * seconds / (time.perf_counter() - started))
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, planned - cfg.warmup_steps))
        lr = (cfg.learning_rate * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else
              cfg.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_learning_rate))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data.train) - cfg.context - 1, (cfg.batch_size,), generator=generator)
        window = torch.from_numpy(np.stack([data.train[s : s + cfg.context + 1] for s in starts.tolist()]))
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    return model, data, step


@torch.no_grad()
def bits_per_byte(model: CharGPT, data: CharData, text: str, context: int, batch_size: int = 256) -> float:
    """Total nats over consecutive windows of the text / (ln 2 x its UTF-8 bytes).

    Every character but the first is predicted once, from the characters before it in its window.
    """
    model.eval()
    ids = torch.from_numpy(data.encode(text))
    total = 0.0
    for length, batch in score_windows(len(ids), context, batch_size):  # the windows OpenLLM is scored on
        window = torch.stack([ids[s : s + length + 1] for s in batch])
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).double(), window[:, 1:].flatten(), reduction="sum").item()
    return language_metrics(total, len(ids) - 1, len(text.encode("utf-8")))["bits_per_byte"]


def train_and_score(seconds: float, raw_dir, cfg: CharConfig = CharConfig(), total_steps: int | None = None) -> dict:
    """Train on ``raw_dir``'s train.jsonl for ``seconds`` (or ``total_steps``), score val.jsonl;
    the figures benchmarks record, with the wall-clock time training took."""
    train_text = "\n".join(iter_documents(raw_dir / "train.jsonl"))
    val_text = "\n".join(iter_documents(raw_dir / "val.jsonl"))
    started = time.perf_counter()
    model, data, steps = train_for(seconds, train_text, cfg, total_steps=total_steps)
    return {"steps": steps, "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - started,
            "val_bits_per_byte": bits_per_byte(model, data, val_text, cfg.context), "config": vars(cfg)}


def train_recipe(raw_dir, cfg: CharConfig = CharConfig()) -> dict:
    """nanoGPT's documented CPU recipe (``NANOGPT_ITERATIONS`` steps, however long they take), scored."""
    return train_and_score(math.inf, raw_dir, cfg, total_steps=NANOGPT_ITERATIONS)
