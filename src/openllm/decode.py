"""The one decode loop: prompts in, tokens and text out, over any ``forward`` function.

Every generator runs through :class:`DecodeBatch`: the onnxruntime generator
(:class:`openllm.runtime.OnnxGenerator`: ``openllm generate``, the app, the export check), the
PyTorch adapter (:mod:`openllm.torch_generate`: training samples, evaluation) and the server's
continuous batching (:mod:`openllm.batching`), where rows join and leave between steps.

``forward(ids, mask, positions, past)`` runs the model once: ``ids`` and ``positions`` (B, T),
``mask`` (B, S) with 1 where a row holds a real token (S = cached + new tokens), ``past`` the
cache (a list of arrays (B, H, S - T, D), or None for an empty one). It returns the logits
(B, T, V) as numpy and the grown cache.

Rows are left-padded to a common length, and every row counts its positions from 0, so a
row's tokens do not depend on which other rows share its batch. Each row samples with its own
random generator, seeded from its :class:`openllm.sampling.Sampling`.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import regex  # like re, plus partial matches: text that more text could turn into a match

from .sampling import Sampling, draw, token_probabilities

Forward = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities of ``logits`` (..., V), computed in float64."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


class _StopMatcher:
    """Finds a stop string in text fed one character at a time, in time linear in the text.

    A Knuth-Morris-Pratt automaton: ``state`` is the length of the longest prefix of the stop
    string that ends the text so far, which is also how much text must be held back.
    """

    def __init__(self, stop: str) -> None:
        self.stop, self.state = stop, 0
        self._fail = [0] * len(stop)  # longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            k += stop[i] == stop[k]
            self._fail[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        state = self.state
        if state == len(self.stop):
            state = self._fail[state - 1]
        while state and char != self.stop[state]:
            state = self._fail[state - 1]
        self.state = state + (char == self.stop[state])
        return self.state == len(self.stop)


def blocked_pattern(patterns: Sequence[str]) -> regex.Pattern[str] | None:
    """One case-insensitive expression matching any of ``patterns`` (an output filter), or None."""
    return regex.compile("|".join(f"(?:{p})" for p in patterns), regex.IGNORECASE) if patterns else None


class TextAssembler:
    """Generated tokens -> text that is safe to show, for one row.

    Safe means: whole UTF-8 characters only, nothing that might still turn out to be the start
    of a stop string, and nothing matched by ``blocked`` (an output filter, see
    :func:`blocked_pattern`), not even the first piece of a match that later tokens complete:
    text that could begin a match is held back until it does or cannot. Invalid bytes become
    U+FFFD.
    """

    def __init__(self, token_bytes: Sequence[bytes], stops: Sequence[str] = (),
                 blocked: regex.Pattern[str] | None = None) -> None:
        self._token_bytes = token_bytes
        self._matchers = [_StopMatcher(s) for s in stops]
        self._blocked = blocked
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far
        self._shown = 0  # characters of _text already handed out
        self.stopped: str | None = None  # "stop" or "content_filter" once the text has ended

    def add(self, token: int) -> str:
        """Append one token; return the newly safe text ('' if none)."""
        new = self._decoder.decode(self._token_bytes[token])
        start = len(self._text)
        self._text += new
        first_stop = None
        for offset, char in enumerate(new):  # every stop is fed every character: linear time
            for matcher in self._matchers:
                if matcher.feed(char):
                    begins = start + offset + 1 - len(matcher.stop)
                    first_stop = begins if first_stop is None else min(first_stop, begins)
        if first_stop is not None:  # the earliest stop string: show what precedes it, then nothing more
            return self._release(first_stop, "stop")
        held = max((m.state for m in self._matchers), default=0)
        return self._release(len(self._text) - held)

    def finish(self) -> str:
        """The held-back rest at the end of generation (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(b"", final=True)
        return self._release(len(self._text), final=True)

    def _release(self, end: int, reason: str | None = None, final: bool = False) -> str:
        """Hand out the text up to ``end``; ``final`` (or a stop): no more text will follow it."""
        if self._blocked is not None:
            final = final or reason is not None
            found = self._blocked.search(self._text, 0, end, partial=not final)
            if found is not None and not found.partial:
                end, reason = found.start(), "content_filter"
            elif found is not None:  # the start of a possible match: wait for the next token
                end = found.start()
        if reason:
            self.stopped = reason
        piece, self._shown = self._text[self._shown:end], max(self._shown, end)
        return piece

    @property
    def text(self) -> str:
        return self._text[: self._shown]


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the ``top`` most likely ones at its step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Row:
    """One sequence to generate: its prompt and settings, then its progress and result."""

    prompt: list[int]
    sampling: Sampling  # its seed seeds this row's random generator
    text: TextAssembler | None = None  # None: tokens only (no stop strings)
    top_logprobs: int | None = None  # record log-probabilities (and this many alternatives)
    started: float = field(default_factory=time.perf_counter)
    budget: int = 0  # new tokens allowed (set by DecodeBatch.add)
    tokens: list[int] = field(default_factory=list)  # generated ids, without the end-of-text id
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # safe text not yet taken by the caller
    finish: str | None = None  # "stop" | "length" | "content_filter" | what cancel() says
    first_token_seconds: float = 0.0  # from `started` to the first chosen token

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def take_pieces(self) -> list[str]:
        pieces, self.pieces = self.pieces, []
        return pieces

    def cancel(self, reason: str) -> None:
        """Stop this row before its next step (a client gone, a time limit)."""
        if self.finish is None:
            self.finish = reason

    def _push(self, token: int, eos_id: int | None) -> None:
        self.first_token_seconds = self.first_token_seconds or time.perf_counter() - self.started
        piece = ""
        if token == eos_id:
            self.finish = "stop"
            piece = self.text.finish() if self.text else ""
        else:
            self.tokens.append(token)
            piece = self.text.add(token) if self.text else ""
            if self.text and self.text.stopped:
                self.finish = self.text.stopped
            elif len(self.tokens) >= self.budget:
                self.finish = "length"
                piece += self.text.finish() if self.text else ""
        if self.text and self.text.stopped:  # the end of text may also have hit the filter
            self.finish = self.text.stopped
        if piece:
            self.pieces.append(piece)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask and positions (B, L) of prompts left-padded to the longest; positions start at 0."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((B, L), np.int64)
    mask = np.zeros((B, L), np.int64)  # 0 = padding
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    return ids, mask, np.maximum(mask.cumsum(axis=1) - 1, 0)


def _pad_left(array: Any, length: int, axis: int) -> Any:
    """``array`` (numpy, or a torch tensor) with zeros before its entries along ``axis`` up to ``length``."""
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    if isinstance(array, np.ndarray):
        widths = [(0, 0)] * array.ndim
        widths[axis] = (missing, 0)
        return np.pad(array, widths)
    import torch  # only for PyTorch caches; the onnxruntime path never gets here

    shape = list(array.shape)
    shape[axis] = missing
    return torch.cat([array.new_zeros(shape), array], dim=axis)


def _concat(arrays: list[Any]) -> Any:
    if isinstance(arrays[0], np.ndarray):
        return np.concatenate(arrays, axis=0)
    import torch

    return torch.cat(arrays, dim=0)


def set_budgets(rows: Sequence[Row], context_length: int) -> None:
    """Check every prompt fits the context with room for a token, then give each row its budget."""
    for row in rows:
        if not 0 < len(row.prompt) < context_length:
            raise ValueError(f"a prompt must hold 1 to {context_length - 1} tokens, not {len(row.prompt)}")
    for row in rows:
        row.budget = min(row.sampling.max_new_tokens, context_length - len(row.prompt))


class DecodeBatch:
    """The rows being generated together; :meth:`add` lets rows join, :meth:`step` advances all.

    Between steps, every row holds the logits of its next token. A step chooses those tokens,
    lets the rows that finished leave, and runs one model call for the rest.
    """

    def __init__(self, forward: Forward, context_length: int, eos_id: int | None) -> None:
        self.forward, self.context_length, self.eos_id = forward, context_length, eos_id
        self.rows: list[Row] = []
        self._mask = np.zeros((0, 0), np.int64)  # (B, S): 1 = a real token in the cache
        self._positions = np.zeros((0, 1), np.int64)  # (B, 1): each row's next position
        self._past: Any = None
        self._logits = np.zeros((0, 0), np.float32)  # (B, V): each row's next-token logits

    def add(self, rows: Sequence[Row]) -> None:
        """Read the prompts of ``rows`` (one model call for all of them) and let them join."""
        set_budgets(rows, self.context_length)
        ids, mask, positions = left_pad([row.prompt for row in rows])
        logits, past = self.forward(ids, mask, positions, None)
        if not self.rows:
            self._mask, self._past = mask, past
            self._positions, self._logits = positions[:, -1:] + 1, logits[:, -1]
        else:  # both caches left-padded to the longer one, then stacked
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = _concat([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)])
            self._past = [_concat([_pad_left(a, length, 2), _pad_left(b, length, 2)]) for a, b in zip(self._past, past)]
            self._positions = np.concatenate([self._positions, positions[:, -1:] + 1])
            self._logits = np.concatenate([self._logits, logits[:, -1]])
        self.rows.extend(rows)

    def step(self) -> None:
        """Choose every row's next token; finished rows leave; one model call for the others."""
        tokens = self._choose()
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        if len(keep) < len(self.rows):
            self._keep(keep)
        if not self.rows:
            return
        self._mask = np.concatenate([self._mask, np.ones((len(keep), 1), np.int64)], axis=1)
        logits, self._past = self.forward(tokens[keep], self._mask, self._positions, self._past)
        self._logits, self._positions = logits[:, -1], self._positions + 1

    def run(self, rows: Sequence[Row]) -> list[Row]:
        """Generate ``rows`` to the end (no others joining); returns them."""
        self.add(rows)
        while self.rows:
            self.step()
        return list(rows)

    def _choose(self) -> np.ndarray:
        """Every unfinished row's next token (B, 1); rows with equal settings share the arithmetic."""
        tokens = np.full((len(self.rows), 1), self.eos_id or 0, np.int64)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, row in enumerate(self.rows):
            if row.finish is None:  # a cancelled row just leaves
                groups.setdefault((row.sampling.temperature, row.sampling.top_k, row.sampling.top_p), []).append(i)
        for members in groups.values():
            logits = self._logits[members]
            sampling = self.rows[members[0]].sampling
            if sampling.temperature == 0:
                tokens[members, 0] = logits.argmax(axis=-1)
            else:  # each row draws from its own generator
                uniforms = np.concatenate([self.rows[i].rng.random((1, 1)) for i in members])
                tokens[members, 0] = draw(token_probabilities(logits, sampling), uniforms)
        for i in (i for members in groups.values() for i in members):
            row = self.rows[i]
            if row.top_logprobs is not None:
                self._record_logprobs(row, self._logits[i], int(tokens[i, 0]))
            row._push(int(tokens[i, 0]), self.eos_id)
        return tokens

    @staticmethod
    def _record_logprobs(row: Row, logits: np.ndarray, token: int) -> None:
        logprobs = log_softmax(logits)
        top = np.argsort(-logprobs, kind="stable")[: row.top_logprobs]
        row.logprobs.append(TokenLogprob(token, float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top]))

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; cache columns that no remaining row uses are dropped."""
        self.rows = [self.rows[i] for i in keep]
        mask = self._mask[keep]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if len(used) else mask.shape[1]
        self._mask, self._positions, self._logits = mask[:, start:], self._positions[keep], self._logits[keep]
        self._past = [p[keep][:, :, start:] for p in self._past] if self.rows else None
