"""Tests for openllm.sampling: the distribution each setting leaves, and the seeded draw."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from openllm.config import ConfigError, parse_params
from openllm.sampling import (MAX_NEW_TOKENS, MAX_TEMPERATURE, Sampling, draw, one_line, sample_next,
                              token_probabilities)

# One row of logits whose softmax is easy to reason about: probabilities 0.4, 0.3, 0.2, 0.1, 0.
PROBS = np.array([0.1, 0.4, 0.0, 0.3, 0.2])
LOGITS = np.log(np.maximum(PROBS, 1e-30))[None]


def test_temperature_one_without_cuts_is_the_softmax() -> None:
    probs = token_probabilities(LOGITS, Sampling(temperature=1.0, top_k=0, top_p=1.0))
    assert np.allclose(probs[0], PROBS)


def test_top_k_keeps_exactly_the_k_most_likely() -> None:
    probs = token_probabilities(LOGITS, Sampling(temperature=1.0, top_k=2, top_p=1.0))[0]
    assert np.flatnonzero(probs).tolist() == [1, 3]  # 0.4 and 0.3
    assert np.allclose(probs[[1, 3]], [0.4 / 0.7, 0.3 / 0.7])


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # 0.4 + 0.3 = 0.7 < 0.75, so the 0.2 token is needed too; the 0.1 token is not.
    probs = token_probabilities(LOGITS, Sampling(temperature=1.0, top_k=0, top_p=0.75))[0]
    assert np.flatnonzero(probs).tolist() == [1, 3, 4]
    assert np.allclose(probs[[1, 3, 4]], [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9])
    only_best = token_probabilities(LOGITS, Sampling(temperature=1.0, top_k=0, top_p=0.4))[0]
    assert np.flatnonzero(only_best).tolist() == [1]


def test_temperature_sharpens_and_flattens() -> None:
    cold = token_probabilities(LOGITS, Sampling(temperature=0.5, top_k=0, top_p=1.0))[0]
    hot = token_probabilities(LOGITS, Sampling(temperature=2.0, top_k=0, top_p=1.0))[0]
    assert cold[1] > PROBS[1] > hot[1]
    assert np.allclose(cold, PROBS**2 / (PROBS**2).sum())


def test_greedy_is_the_argmax_and_draws_follow_the_cdf() -> None:
    assert sample_next(LOGITS, Sampling(temperature=0.0), np.random.default_rng(0)).tolist() == [1]
    # Cumulative mass 0.1, 0.5, 0.5, 0.8, 1.0: a uniform number u picks the first token whose mass passes it.
    picks = [int(draw(PROBS[None], np.array([[u]]))[0]) for u in (0.05, 0.3, 0.55, 0.95)]
    assert picks == [0, 1, 3, 4]


def test_rows_together_equal_rows_alone_and_seeds_repeat() -> None:
    logits = np.random.default_rng(1).normal(size=(6, 50))
    settings = Sampling(temperature=0.9, top_k=10, top_p=0.8)
    together = token_probabilities(logits, settings)
    for i in range(6):
        assert np.array_equal(together[i], token_probabilities(logits[i:i + 1], settings)[0])
    first = sample_next(logits, settings, np.random.default_rng(5))
    assert np.array_equal(first, sample_next(logits, settings, np.random.default_rng(5)))
    counts = np.bincount([sample_next(logits[:1], settings, np.random.default_rng(s))[0] for s in range(400)],
                         minlength=50)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(together[0]))  # never outside the kept tokens


@pytest.mark.parametrize("changes, message", [
    ({"temperature": MAX_TEMPERATURE + 0.1}, "temperature=5.1: Input should be less than or equal to 5"),
    ({"temperature": float("nan")}, "temperature=nan: Input should be a finite number"),
    ({"top_k": -1}, "top_k=-1: Input should be greater than or equal to 0"),
    ({"top_k": True}, "top_k=True: Input should be a valid integer"),
    ({"top_p": 0.0}, "top_p=0.0: Input should be greater than 0"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens=4097: Input should be less than or equal to 4096"),
    ({"seed": -1}, "seed=-1: Input should be greater than or equal to 0"),
    ({"temprature": 1.0}, "temprature=1.0: Extra inputs are not permitted"),
])
def test_bounds(changes: dict, message: str) -> None:
    """One line naming the field; a changed copy is checked like a new one."""
    with pytest.raises(ValidationError) as new:
        Sampling(**changes)
    with pytest.raises(ValidationError) as changed:
        Sampling().replace(**changes)
    assert one_line(new.value) == one_line(changed.value) == message


def test_params_yaml_sampling_is_the_same_type_with_the_same_bounds() -> None:
    """evaluate.sampling in params.yaml is a Sampling: a bad value fails there with the field's path."""
    assert isinstance(parse_params({}).evaluate.sampling, Sampling)
    with pytest.raises(ConfigError, match=r"evaluate\.sampling\.top_p=1\.5: Input should be less than or equal to 1"):
        parse_params({"evaluate": {"sampling": {"top_p": 1.5}}})
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate\.sampling\.temprature'"):
        parse_params({"evaluate": {"sampling": {"temprature": 1.0}}})
    with pytest.raises(ConfigError, match="evaluate.sampling.seed is null"):
        parse_params({"evaluate": {"sampling": {"seed": None}}})
