"""A small decoder-only transformer in the Llama layout.

Shape legend used in comments:
    B = batch, T = new tokens in this call, T_past = cached tokens, S = T_past + T,
    C = n_embd, H = n_head, D = head_dim = C // H, V = vocab_size, I = intermediate_size.

The module names mirror Hugging Face ``LlamaForCausalLM`` one-to-one (see
``hf_weight_names``), so exporting is a pure rename of the state dict.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# One (key, value) pair per layer, each (B, H, T_past, D).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTConfig:
    """Hyper-parameters of the model. All fields are JSON-friendly."""

    vocab_size: int
    context_length: int  # max positions the model is trained for
    n_layer: int
    n_head: int
    n_embd: int
    intermediate_size: int  # MLP hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Research levers, off by default. Any of them on gives a model the Llama layout cannot
    # represent (see ``LEVER_DEFAULTS``): the ONNX export still works; the Hugging Face one is a
    # Qwen3 model for qk_norm alone, and is skipped otherwise.
    qk_norm: bool = False  # RMSNorm on each head's query and key, before the rotary embedding
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    mlp: str = "swiglu"  # "swiglu" or "relu2" (down(relu(up(x))^2), no gate)
    value_embeds: bool = False  # a second token embedding, added (gated per layer) to every layer's values

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        for name in ("qk_norm", "value_embeds"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.logit_softcap is not None and (isinstance(self.logit_softcap, bool) or not
                                               isinstance(self.logit_softcap, (int, float)) or not self.logit_softcap > 0):
            raise ValueError(f"logit_softcap={self.logit_softcap!r} must be a positive number or null")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r} must be one of {list(MLP_KINDS)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim=n_embd/n_head={self.head_dim} must be even (rotary embeddings rotate pairs)"
            )

    @property
    def head_dim(self) -> int:
        """Width D of one attention head."""
        return self.n_embd // self.n_head

    def levers(self) -> dict[str, Any]:
        """The research levers that differ from their defaults (empty for a Llama-layout model)."""
        return {name: getattr(self, name) for name, default in LEVER_DEFAULTS.items() if getattr(self, name) != default}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (round-trips through JSON).

        Levers at their defaults are left out, so a default model's config.json keeps the bytes it
        had before the levers existed; ``from_dict`` fills them back in.
        """
        return {k: v for k, v in asdict(self).items() if k not in LEVER_DEFAULTS} | self.levers()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build a config from a dict, rejecting unknown or missing keys with a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; allowed keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}  # fields without a default
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"missing GPTConfig key(s) {missing}")
        return cls(**d)


MLP_KINDS = ("swiglu", "relu2")
LEVER_DEFAULTS: dict[str, Any] = {"qk_norm": False, "logit_softcap": None, "mlp": "swiglu", "value_embeds": False}


def hf_weight_names(n_layer: int, qk_norm: bool = False) -> dict[str, str]:
    """Map our state-dict names to Hugging Face ``LlamaForCausalLM`` names (``Qwen3ForCausalLM``
    with ``qk_norm``: the same names plus each attention's ``q_norm`` and ``k_norm``).

    ``lm_head.weight`` and ``tok_embeddings.weight`` are the same tensor (tied);
    both names are listed because both appear in ``state_dict()``.
    """
    names = {"tok_embeddings.weight": "model.embed_tokens.weight"}
    for i in range(n_layer):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = f"{hf}.input_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if qk_norm else ()):
            names[f"{ours}.attn.{proj}.weight"] = f"{hf}.self_attn.{proj}.weight"
        names[f"{ours}.mlp_norm.weight"] = f"{hf}.post_attention_layernorm.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}.mlp.{proj}.weight"] = f"{hf}.mlp.{proj}.weight"
    names["norm.weight"] = "model.norm.weight"
    names["lm_head.weight"] = "lm_head.weight"
    return names


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, no bias, no mean-centring."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute in float32: squaring bf16/fp16 activations overflows or loses precision.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)  # same op order as HF Llama


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions (B, T) -> each (B, 1, T, D), broadcast over heads."""
    # Computed from the positions on every call (no precomputed cache), so export
    # sees no Python-int-sized tables and any position value works.
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions and a KV cache."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # created only when on, so a default model's weights and init are unchanged
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        if cfg.value_embeds:  # how much of the token's value embedding this layer adds to its values
            self.ve_gate = nn.Parameter(torch.ones(1))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (B, 1, T, D)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # bool (B or 1, 1, T, S), True = may attend
        past: tuple[torch.Tensor, torch.Tensor] | None,
        need_probs: bool = False,
        ve: torch.Tensor | None = None,  # (B, T, C): the value embeddings of the new tokens
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, D)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if ve is not None:  # before the cache, so cached values already hold it
            v = v + self.ve_gate * ve.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:  # append the new positions to the cache: (B, H, S, D)
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        probs = None
        if need_probs:  # explicit softmax, slower than SDPA, so that the weights can be returned
            visible = mask if mask is not None else build_attention_mask(T, 0, None, x.device)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            y = probs @ v
        else:  # mask None means "plain causal, no past": let SDPA use its fused causal path.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.o_proj(y), (k, v), probs


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); or with ``mlp: relu2``, down(relu(up(x))^2)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.relu2 = cfg.mlp == "relu2"
        if not self.relu2:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu2:
            return self.down_proj(F.relu(self.up_proj(x)).square())  # (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_probs: bool = False,
        ve: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        h, present, probs = self.attn(self.attn_norm(x), cos, sin, mask, past, need_probs, ve)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, present, probs


def build_attention_mask(
    T: int, T_past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S): causal, combined with a 1/0 padding mask (B, S)."""
    q_pos = torch.arange(T, device=device)[:, None] + T_past  # (T, 1) absolute query positions
    k_pos = torch.arange(T_past + T, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos  # (T, S): row i sees keys j <= T_past + i
    if attention_mask is None:
        return mask[None, None]
    mask = mask[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    # A padding query has no visible key; an all-False row makes softmax NaN.
    # Let every query see itself (a no-op for real tokens, which already do).
    return mask | (k_pos == q_pos)


class GPT(nn.Module):
    """Llama-style language model with tied input embedding and output head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing: bool = False
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_embeddings.weight  # tie: both (V, C)
        if config.value_embeds:  # a lookup, like the input embedding: memory, but no matmul FLOPs
            self.value_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        D = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, not a weight
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.ones_(p)  # RMSNorm scales
        # GPT-2: each residual branch adds to the stream 2*n_layer times; shrink so the
        # variance of the residual stream does not grow with depth.
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn.o_proj.weight, mean=0.0, std=std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        return_attention: bool = False,
    ):
        """Run the model on ``input_ids`` (B, T).

        past_key_values: per-layer (key, value), each (B, H, T_past, D); T_past may be 0.
        position_ids: (B, T); defaults to T_past .. T_past+T-1.
        attention_mask: (B, T_past+T), 1 = real token, 0 = (left) padding.
        Returns logits (B, T, V) in float32 and the updated cache (None if not use_cache);
        with ``return_attention`` also each layer's attention probabilities (B, H, T, S),
        computed by an explicit softmax (for inspecting the model, not for speed).
        """
        B, T = input_ids.shape
        T_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(T_past, T_past + T, device=input_ids.device)[None].expand(B, T)

        x = self.tok_embeddings(input_ids)  # (B, T, C)
        ve = self.value_embeddings(input_ids) if self.config.value_embeds else None  # (B, T, C)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, x.dtype)  # (B, 1, T, D)
        mask = None  # None -> SDPA is_causal fast path
        if attention_mask is not None or past_key_values is not None:
            mask = build_attention_mask(T, T_past, attention_mask, input_ids.device)

        # Recompute activations in backward instead of storing them (training only).
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        presents: KVCache = []
        attentions: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if ckpt and past is None:
                x, kv, probs = checkpoint(layer, x, cos, sin, mask, None, False, ve, use_reentrant=False)
            else:
                x, kv, probs = layer(x, cos, sin, mask, past, return_attention, ve)
            presents.append(kv)
            attentions.append(probs)

        logits = self.lm_head(self.norm(x)).float()  # (B, T, V)
        cap = self.config.logit_softcap
        if cap is not None:  # smoothly bounded to (-cap, cap)
            logits = cap * torch.tanh(logits / cap)
        if return_attention:
            return logits, (presents if use_cache else None), attentions
        return logits, (presents if use_cache else None)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; the tied embedding/head matrix is counted once.

        ``exclude_embeddings`` leaves out the lookup tables (the token and value embeddings).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied tensors
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if self.config.value_embeds:
                n -= self.value_embeddings.weight.numel()
        return n

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM / nanoGPT style.

        6 * N for the matmuls, where N = non-embedding params + the head matmul (V*C;
        the embedding lookup itself is free, but the tied head is a real matmul),
        plus 12 * n_layer * n_embd * context_length for attention scores and values.
        """
        cfg = self.config
        n = self.num_parameters(exclude_embeddings=True) + cfg.n_embd * cfg.vocab_size
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.context_length
