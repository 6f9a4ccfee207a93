"""Tests for openllm.model: KV cache, padding, parameter counts, HF equivalence."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import REPO_ROOT
from openllm.config import MODEL_PRESETS
from openllm.model import GPT, GPTConfig, hf_weight_names
from openllm.optim import build_optimizer
from openllm.sampling import Sampling
from openllm.torch_generate import generate_ids


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_embd=32, intermediate_size=64)
    kw.update(overrides)
    return GPTConfig(**kw)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def expected_params(c: GPTConfig) -> int:
    per_layer = 2 * c.n_embd + 4 * c.n_embd * c.n_embd + 3 * c.n_embd * c.intermediate_size
    return c.vocab_size * c.n_embd + c.n_layer * per_layer + c.n_embd  # embedding counted once


# ---------------------------------------------------------------- KV cache


def test_prefill_then_decode_matches_full_forward(model: GPT) -> None:
    ids = torch.randint(0, 97, (2, 12))
    full, present = model(ids)
    assert full.shape == (2, 12, 97) and full.dtype == torch.float32
    assert len(present) == 2 and present[0][0].shape == (2, 4, 12, 8)

    logits, past = model(ids[:, :5])
    steps = [logits]
    for t in range(5, 12):
        logits, past = model(ids[:, t : t + 1], past_key_values=past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert past[0][0].shape == (2, 4, 12, 8)


def test_split_prefill_and_empty_past(model: GPT) -> None:
    ids = torch.randint(0, 97, (2, 12))
    full, _ = model(ids)
    a, past = model(ids[:, :7])
    b, _ = model(ids[:, 7:], past_key_values=past)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)

    empty = [(torch.zeros(2, 4, 0, 8), torch.zeros(2, 4, 0, 8)) for _ in range(2)]
    c, _ = model(ids, past_key_values=empty)
    torch.testing.assert_close(c, full, atol=1e-5, rtol=0)


def test_use_cache_false_returns_none(model: GPT) -> None:
    logits, present = model(torch.randint(0, 97, (1, 4)), use_cache=False)
    assert present is None and logits.shape == (1, 4, 97)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("explicit_positions", [True, False])
def test_left_padding_matches_unpadded(model: GPT, explicit_positions: bool) -> None:
    # Without explicit positions the pads shift absolute positions, but rotary
    # attention depends only on relative distance, so the result is the same.
    seqs = [torch.randint(0, 97, (5,)), torch.randint(0, 97, (8,))]
    T = 8
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if explicit_positions else None

    logits, past = model(ids, attention_mask=mask, position_ids=pos)
    assert not torch.isnan(logits).any()
    for b, s in enumerate(seqs):
        alone, _ = model(s[None])
        torch.testing.assert_close(logits[b, T - len(s) :], alone[0], atol=1e-5, rtol=0)

    # One decode step with the cache and the padding mask extended by one real token.
    nxt = torch.tensor([[3], [4]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    pos2 = None if pos is None else pos[:, -1:] + 1
    step, _ = model(nxt, past_key_values=past, attention_mask=mask2, position_ids=pos2)
    assert not torch.isnan(step).any()
    for b, s in enumerate(seqs):
        alone, _ = model(torch.cat([s, nxt[b]])[None])
        torch.testing.assert_close(step[b, 0], alone[0, -1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parameters


def test_parameter_count_and_tying(model: GPT) -> None:
    c = model.config
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert model.num_parameters() == expected_params(c)
    assert model.num_parameters(exclude_embeddings=True) == expected_params(c) - c.vocab_size * c.n_embd


def test_flops_per_token_match_a_count_of_a_training_step() -> None:
    """The estimate against torch's FLOP counter over a real forward and backward at full context.

    The math attention kernel runs its matmuls as ops the counter sees (over the whole T x T
    square, as the estimate assumes); the estimate also counts 6 FLOPs per RMSNorm weight, which
    the counter (matmuls only) does not.
    """
    c = tiny_config(context_length=16)
    torch.manual_seed(0)
    model = GPT(c)
    ids = torch.randint(0, c.vocab_size, (1, c.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(ids, use_cache=False)
        logits.sum().backward()
    counted = counter.get_flop_counts()["Global"]
    assert {str(op) for op in counted} == {"aten.mm", "aten.bmm"}  # mm: linear layers and head; bmm: attention
    norm_weights = 2 * c.n_layer * c.n_embd + c.n_embd
    assert counter.get_total_flops() == (model.estimate_flops_per_token() - 6 * norm_weights) * c.context_length


def test_init_scales() -> None:
    torch.manual_seed(0)
    m = GPT(tiny_config(n_embd=64, n_layer=8, intermediate_size=256))
    assert torch.all(m.norm.weight == 1) and torch.all(m.layers[0].attn_norm.weight == 1)
    assert abs(m.layers[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2*8)


def readme_presets() -> dict[str, dict[str, float]]:
    """The README's model preset table: name -> shape, stated parameters (millions) and vocabulary."""
    section = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("### Model presets", 1)[1]
    rows = re.findall(r"^\| `(\w+)`[^|]*\| (\d+) \| (\d+) \| (\d+) \| ([\d,]+) \| ([\d.]+)M with \D*([\d,]+)",
                      section.split("\n\n", 2)[1], re.M)
    keys = ("n_layer", "n_head", "n_embd", "context_length", "millions", "vocab_size")
    return {name: dict(zip(keys, (float(v.replace(",", "")) for v in values))) for name, *values in rows}


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_each_preset_runs_a_full_window_and_has_the_size_the_readme_states(preset: str) -> None:
    stated = readme_presets()[preset]
    shape = MODEL_PRESETS[preset]
    assert {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "context_length")} == {
        k: int(stated[k]) for k in ("n_layer", "n_head", "n_embd", "context_length")}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=int(stated["vocab_size"]), **shape)).eval()
    assert round(model.num_parameters() / 1e6, 1) == stated["millions"]
    assert model.config.head_dim * model.config.n_head == model.config.n_embd
    ids = torch.randint(0, model.config.vocab_size, (1, model.config.context_length))
    with torch.no_grad():
        logits, _ = model(ids, use_cache=False)
    assert logits.shape == (1, model.config.context_length, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_the_readme_lists_every_preset() -> None:
    assert sorted(readme_presets()) == sorted(MODEL_PRESETS)


# ---------------------------------------------------------------- config


def test_config_roundtrip() -> None:
    c = tiny_config(rope_theta=5000.0)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.head_dim == 8


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30), "n_embd"),  # not divisible by n_head=4
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(n_embd=36, n_head=4), "head_dim"),  # head_dim 9 is odd
    ],
)
def test_config_validation(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_from_dict_unknown_key() -> None:
    d = tiny_config().to_dict() | {"dropout": 0.1}
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig.from_dict(d)


# ---------------------------------------------------------------- Hugging Face


def test_matches_hf_llama() -> None:
    transformers = pytest.importorskip("transformers")
    c = tiny_config(rope_theta=5000.0, norm_eps=1e-6)  # non-defaults prove they are mapped
    torch.manual_seed(1)
    ours = GPT(c).eval()
    hf_cfg = transformers.LlamaConfig(
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.context_length,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = hf_weight_names(c.n_layer)
    sd = {names[k]: v for k, v in ours.state_dict().items()}
    assert set(sd) == set(hf.state_dict())  # the map covers every weight, both ways
    hf.load_state_dict(sd)

    ids = torch.randint(0, c.vocab_size, (2, 16))
    with torch.no_grad():
        want = hf(ids).logits
    got, _ = ours(ids)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- training helpers


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    torch.manual_seed(0)
    m = GPT(tiny_config()).train()
    ids = torch.randint(0, 97, (2, 16))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        logits, _ = m(ids[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss_a, grads_a = loss_and_grads()
    m.gradient_checkpointing = True
    loss_b, grads_b = loss_and_grads()
    torch.testing.assert_close(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)


def test_decode_loop_greedy_matches_full_forward_argmax(model: GPT) -> None:
    """The PyTorch adapter of the one decode loop (openllm.torch_generate) against plain forward passes."""
    prompt = torch.randint(0, 97, (5,)).tolist()
    out = generate_ids(model, prompt, Sampling(temperature=0.0, max_new_tokens=8))
    ids = torch.tensor([prompt])
    for _ in range(8):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == ids[0, 5:].tolist()


def test_adamw_groups_decay_matrices_only(model: GPT) -> None:
    opt = build_optimizer(model, "adamw", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen})  # no tensor twice (tied weight!)
    assert {id(p) for p in seen} == {id(p) for p in model.parameters() if p.requires_grad}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    norm_ids = {id(model.norm.weight), id(model.layers[0].attn_norm.weight)}
    assert any(id(p) in norm_ids for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"])


def test_muon_optimizer_splits_hidden_matrices_from_the_rest(model: GPT) -> None:
    opt = build_optimizer(model, "muon", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = [p for g in opt.adamw.param_groups for p in g["params"]]
    assert len(adamw) == len({id(p) for p in adamw}) and not muon_ids & {id(p) for p in adamw}
    assert muon_ids | {id(p) for p in adamw} == {id(p) for p in model.parameters()}
    assert id(model.layers[0].attn.q_proj.weight) in muon_ids
    assert id(model.layers[0].mlp.down_proj.weight) in muon_ids
    assert id(model.tok_embeddings.weight) not in muon_ids  # tied with the head: AdamW
    assert id(model.norm.weight) not in muon_ids
    assert len(opt.param_groups) == len(opt.muon.param_groups) + 2

    # A few steps lower the loss on a fixed batch, and the state round-trips.
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        logits, _ = model(ids[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    again = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95))
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.muon.state_dict()["state"][0]["momentum_buffer"],
                       opt.muon.state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="Muon"):
        again.load_state_dict(build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95)).state_dict())
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd", 1e-3, 0.1, (0.9, 0.95))
