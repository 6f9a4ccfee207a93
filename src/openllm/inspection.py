"""What a checkpoint thinks of a text, token by token: surprisal, next-token choices, attention.

The Inspect page of the app and the documentation's figures use these functions. Everything
runs on an export folder with onnxruntime and numpy (PyTorch is imported only by
:func:`export_attention_onnx`, which the export stage calls):

- :func:`token_surprisals` -- each token of a text with its surprisal in bits, from the
  export's ``model.onnx``;
- :func:`top_next_tokens` -- the most likely next tokens after a position;
- :class:`AttentionModel` -- ``model.attention.onnx``, a variant of the model without a KV
  cache that also outputs every layer's attention probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import OpenLLMError
from .runtime import OnnxGenerator

ATTENTION_FILE = "model.attention.onnx"  # written next to model.onnx by the export stage


class InspectionError(OpenLLMError, ValueError):
    """A text or position that cannot be inspected, or a missing attention model."""


@dataclass(frozen=True)
class TokenSurprisal:
    """One token of the text: its id, its text, and how surprised the model was to see it."""

    token_id: int
    text: str  # the token's text (see piece_text)
    n_bytes: int  # UTF-8 bytes the token stands for
    bits: float | None  # -log2 p(token | the tokens before); None for the first (nothing predicts it)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def piece_text(tokenizer, token: int) -> str:
    """How a token reads on screen: its text, or ``<0xE2>`` for one byte of a longer character."""
    if tokenizer.is_control(token):
        return ""
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


def encode_for_inspection(generator: OnnxGenerator, text: str) -> list[int]:
    """The ids of ``text``, checked to fit one window of the model's context."""
    if not isinstance(text, str) or not text:
        raise InspectionError("the text to inspect is empty")
    ids = generator.encode(text)
    if len(ids) > generator.context_length:
        raise InspectionError(f"the text is {len(ids)} tokens; this model reads at most "
                              f"{generator.context_length} at once")
    return ids


def log_probabilities(generator: OnnxGenerator, ids: list[int]) -> np.ndarray:
    """Log-probabilities (nats) of every next token after each position: (T, V)."""
    T = len(ids)
    logits, _ = generator.forward(np.asarray([ids], np.int64), np.ones((1, T), np.int64),
                                  np.arange(T, dtype=np.int64)[None], generator.empty_past(1))
    return _log_softmax(logits[0])


def token_surprisals(generator: OnnxGenerator, text: str) -> list[TokenSurprisal]:
    """Every token of ``text`` with its surprisal in bits under the model."""
    ids = encode_for_inspection(generator, text)
    logp = log_probabilities(generator, ids)
    found = []
    for position, token in enumerate(ids):
        bits = None if position == 0 else -float(logp[position - 1, token]) / math.log(2)
        text = piece_text(generator.tokenizer, token)
        found.append(TokenSurprisal(token, text, generator.count_bytes([token]), bits))
    return found


def bits_per_byte(tokens: list[TokenSurprisal]) -> float:
    """Total surprisal over the bytes of the predicted tokens (the first token is not counted)."""
    scored = [t for t in tokens if t.bits is not None]
    n_bytes = sum(t.n_bytes for t in scored)
    if not n_bytes:
        raise InspectionError("the text needs at least two tokens to measure bits per byte")
    return sum(t.bits for t in scored) / n_bytes


def top_next_tokens(generator: OnnxGenerator, text: str, position: int, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens to follow the token at ``position`` (0-based), as (text, probability)."""
    ids = encode_for_inspection(generator, text)
    if not 0 <= position < len(ids):
        raise InspectionError(f"position {position} is outside the text's {len(ids)} tokens")
    probs = np.exp(log_probabilities(generator, ids)[position])
    best = np.argsort(-probs, kind="stable")[:k]
    return [(piece_text(generator.tokenizer, int(i)), float(probs[i])) for i in best]


class AttentionModel:
    """``model.attention.onnx`` of an export folder: ids in, logits and attention maps out."""

    def __init__(self, folder: str | Path) -> None:
        path = Path(folder) / ATTENTION_FILE
        if not path.is_file():
            raise InspectionError(f"{path} is missing: export the checkpoint again (`openllm export`) "
                                  "to get attention maps")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def attention(self, ids: list[int]) -> np.ndarray:
        """Attention probabilities (layers, heads, T, T): row i is what token i looks at."""
        if not ids:
            raise InspectionError("no tokens to attend over")
        _, maps = self.session.run(None, {"input_ids": np.asarray([ids], np.int64)})
        return maps[:, 0]


def export_attention_onnx(model: Any, path: Path, opset: int) -> None:
    """Write ``model`` (a :class:`openllm.model.GPT`) as an ONNX file whose outputs are
    ``logits`` (1, T, V) and ``attentions`` (layers, 1, heads, T, T); no KV cache."""
    import torch

    class WithAttention(torch.nn.Module):
        def __init__(self, gpt) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, input_ids):
            logits, _, attentions = self.gpt(input_ids, use_cache=False, return_attention=True)
            return logits, torch.stack(attentions)

    import onnx

    from .onnx_export import export_program

    example = torch.zeros(1, 3, dtype=torch.long)
    proto = export_program(WithAttention(model), (example,), InspectionError,
                           dynamic_shapes={"input_ids": {1: torch.export.Dim("sequence")}},
                           input_names=["input_ids"], output_names=["logits", "attentions"], opset_version=opset)
    onnx.save_model(proto, str(path), save_as_external_data=False)
