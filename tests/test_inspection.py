"""openllm.inspection and GPT's attention probabilities, on the tiny real export of fixtures_export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_export import build_export
from openllm.checkpoint import load_model
from openllm.inspection import (
    ATTENTION_FILE, AttentionModel, InspectionError, bits_per_byte, token_surprisals, top_next_tokens,
)
from openllm.model import GPT, GPTConfig
from openllm.runtime import OnnxGenerator

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def export(session_dir: Path) -> Path:
    return build_export(session_dir / "inspection", quantize=False, huggingface=False)


@pytest.fixture(scope="module")
def generator(export: Path) -> OnnxGenerator:
    return OnnxGenerator.load(export)


def test_attention_probabilities_leave_the_logits_unchanged_and_are_causal() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16, intermediate_size=32))
    ids = torch.randint(0, 50, (2, 7))
    plain, _ = model(ids)
    logits, _, attentions = model(ids, return_attention=True)
    assert torch.allclose(plain, logits, atol=1e-6)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 7, 7)
    probs = attentions[1]
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 7), atol=1e-6)
    assert float(probs.triu(diagonal=1).abs().max()) == 0.0  # no token looks at a later one
    # With a cache the new queries see every cached key.
    _, past = model(ids[:, :4])
    tail, _, cached = model(ids[:, 4:], past_key_values=past, return_attention=True)
    assert torch.allclose(tail, plain[:, 4:], atol=1e-5) and cached[0].shape == (2, 2, 3, 7)


def test_attention_onnx_matches_pytorch(export: Path, generator: OnnxGenerator, session_dir: Path) -> None:
    assert (export / ATTENTION_FILE).is_file()  # written by the export stage
    model = load_model(session_dir / "inspection" / "checkpoints" / "step-10")
    ids = generator.encode(TEXT)
    maps = AttentionModel(export).attention(ids)
    _, _, want = model(torch.tensor([ids]), return_attention=True)
    want = torch.stack(want)[:, 0].detach().numpy()
    assert maps.shape == (2, 4, len(ids), len(ids))
    assert np.abs(maps - want).max() < 1e-5


def test_surprisal_adds_up_to_the_scored_loss(generator: OnnxGenerator) -> None:
    tokens = token_surprisals(generator, TEXT)
    assert tokens[0].bits is None and all(t.bits > 0 for t in tokens[1:])
    assert "".join(t.text for t in tokens) == TEXT
    total_bits = sum(t.bits for t in tokens[1:])
    score = generator.score(TEXT)  # loss in nats per predicted token
    assert math.isclose(total_bits * math.log(2), score["loss"] * (len(tokens) - 1), rel_tol=1e-4)
    predicted_bytes = len(TEXT.encode()) - tokens[0].n_bytes
    assert math.isclose(bits_per_byte(tokens), total_bits / predicted_bytes)


def test_top_next_tokens_are_sorted_probabilities(generator: OnnxGenerator) -> None:
    top = top_next_tokens(generator, TEXT, position=3, k=5)
    probs = [p for _, p in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_bad_inputs_are_refused_with_a_reason(generator: OnnxGenerator, tmp_path: Path) -> None:
    with pytest.raises(InspectionError, match="empty"):
        token_surprisals(generator, "")
    with pytest.raises(InspectionError, match="outside the text"):
        top_next_tokens(generator, "ROMEO", position=99)
    with pytest.raises(InspectionError, match="reads at most"):
        token_surprisals(generator, "word " * 400)
    with pytest.raises(InspectionError, match="export the checkpoint again"):
        AttentionModel(tmp_path)
