"""openllm.bias: the minimal pairs and their log-probability gaps, on a tiny random checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fixtures_export import build_checkpoint
from openllm.bias import CONTEXT, PAIRS, MinimalPair, bias_metrics, fits, pair_gaps, sentence_logprob, summarize
from openllm.checkpoint import TOKENIZER, load_model
from openllm.evaluate import token_nats
from openllm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(session_dir: Path):
    folder = build_checkpoint(session_dir / "bias" / "checkpoints")
    return load_model(folder), load_tokenizer(folder / TOKENIZER)


def test_each_pair_differs_in_its_one_word_only() -> None:
    for pair in PAIRS:
        masculine, feminine = pair.sentences()
        head, tail = pair.template.split("{}")  # exactly one slot
        assert masculine == head + pair.masculine + tail and feminine == head + pair.feminine + tail
        assert pair.masculine != pair.feminine


def test_sentence_logprob_is_the_negative_loss_of_its_tokens(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    sentence = PAIRS[0].sentences()[0]
    ids = tokenizer.encode(CONTEXT + sentence)
    assert len(tokenizer.encode(CONTEXT)) == 1  # so token_nats (which skips one token) scores the same tokens
    nats, count = token_nats(model, np.asarray(ids, np.int64))
    assert count == len(ids) - 1
    assert math.isclose(sentence_logprob(model, tokenizer, sentence), -nats, rel_tol=1e-6)


def test_swapping_the_words_flips_the_gap(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    pairs = PAIRS[:3]
    swapped = tuple(MinimalPair(p.template, p.feminine, p.masculine) for p in pairs)
    gaps, flipped = pair_gaps(model, tokenizer, pairs), pair_gaps(model, tokenizer, swapped)
    assert all(g != 0 for g in gaps)
    assert np.allclose(gaps, [-g for g in flipped])
    figures = bias_metrics(model, tokenizer)
    assert set(figures) == {"bias_gap_mean_nats", "bias_pairs_masculine_share"}
    assert 0 <= figures["bias_pairs_masculine_share"] <= 1


def test_summarize_and_its_errors() -> None:
    assert summarize([1.0, -0.5, 2.0, 0.0]) == {"bias_gap_mean_nats": 0.625, "bias_pairs_masculine_share": 0.5}
    with pytest.raises(ValueError, match="finite"):
        summarize([float("nan")])
    with pytest.raises(ValueError, match="finite"):
        summarize([])


def test_a_model_too_short_for_the_sentences_gets_no_bias_figures(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    long_pair = MinimalPair("word " * model.config.context_length + "{}", "he", "she")
    assert not fits(model, tokenizer, long_pair)
    with pytest.raises(ValueError, match="fit the context"):
        pair_gaps(model, tokenizer, (long_pair,))
    model.config.context_length, saved = 8, model.config.context_length
    try:
        assert bias_metrics(model, tokenizer) == {}
    finally:
        model.config.context_length = saved
