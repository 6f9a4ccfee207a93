"""onnxruntime-genai behind the decode loop: ``OnnxGenerator.load(..., engine="genai")``.

:class:`GenaiBatch` has the interface of :class:`openllm.decode.DecodeBatch` (``rows``,
``add``, ``step``), so everything built on the decode loop runs on it unchanged:
``openllm generate --engine genai``, the server's scheduler (``serve.engine: genai``) and the
app. onnxruntime-genai runs the model, keeps the KV cache and chooses the tokens in C++; the
rows still turn tokens into text, so stop strings, the output filter, token limits and
cancellation behave as with the default engine.

Each row gets its own ``onnxruntime_genai.Generator``: its sampling settings and seed are
per row, and rows may join or leave at any step. A step advances the rows one after another,
so rows do not share a model call; the default engine, which stacks them into one call, is
faster under concurrent load (bench/genai.py measures both).

What differs from the default engine: greedy decoding gives the same tokens, but a sampled
row draws from onnxruntime-genai's random generator, so a seed repeats its text on this engine
without matching the default engine's text; log-probabilities are not available.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .decode import set_budgets

if TYPE_CHECKING:
    from .decode import Row

ENGINES = ("onnxruntime", "genai")
GENAI_CONFIG = "genai_config.json"  # in each genai folder of an export (openllm.genai writes them)
INT8_DIR = "int8"  # the int8 model's genai folder, inside the export folder


def load_genai_model(folder: Path, threads: int = 0) -> Any:
    """An ``onnxruntime_genai.Model`` for an export's genai folder (``threads`` 0 = its default)."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


class GenaiBatch:
    """The rows being generated, each by its own onnxruntime-genai generator; see the module docstring."""

    def __init__(self, model: Any, context_length: int, eos_id: int | None, vocab_size: int) -> None:
        self.model, self.context_length, self.eos_id, self.vocab_size = model, context_length, eos_id, vocab_size
        self.rows: list[Row] = []
        self._generators: list[Any] = []

    def add(self, rows: Sequence[Row]) -> None:
        """Start a generator for each row and read its prompt."""
        import onnxruntime_genai as og

        if any(row.top_logprobs is not None for row in rows):  # all checked before any starts
            raise ValueError("log-probabilities are not available with the genai engine")
        set_budgets(rows, self.context_length)
        for row in rows:
            params = og.GeneratorParams(self.model)
            params.set_search_options(**search_options(row, self.vocab_size))
            generator = og.Generator(self.model, params)
            generator.append_tokens(np.asarray([row.prompt], np.int32))
            self.rows.append(row)
            self._generators.append(generator)

    def step(self) -> None:
        """One new token for every unfinished row; finished rows leave."""
        for row, generator in zip(self.rows, self._generators):
            if row.finish is None:  # a cancelled row just leaves
                generator.generate_next_token()
                row._push(int(generator.get_next_tokens()[0]), self.eos_id)
        kept = [(r, g) for r, g in zip(self.rows, self._generators) if r.finish is None]
        self.rows, self._generators = [r for r, _ in kept], [g for _, g in kept]


def search_options(row: Row, vocab_size: int) -> dict[str, Any]:
    """onnxruntime-genai's search options for a row: its sampling, seed and length."""
    sampling = row.sampling
    options: dict[str, Any] = {"max_length": len(row.prompt) + row.budget, "batch_size": 1}
    if sampling.temperature == 0:
        return options | {"do_sample": False}
    options |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k or vocab_size}  # 0 (off) is "every token"
    if sampling.seed is not None:
        options["random_seed"] = sampling.seed
    return options
