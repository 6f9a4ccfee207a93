"""The MLflow pyfunc model of an export: prompts in, generated text out.

Logged by :func:`openllm.registry.register_export` as a "model from code" (MLflow runs this
file when it loads the model; nothing is pickled), with the export folder as its artifact and
the ``openllm`` package as its code, so ``mlflow.pyfunc.load_model(...).predict`` and
``mlflow models serve`` need only onnxruntime, sentencepiece, numpy, pydantic and pyyaml.

Input: a ``prompt`` column (a DataFrame, a ``{"prompt": [...]}`` dict or a list of strings).
Parameters: ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens``, ``seed``; left out,
they take the export's sampling. Output: one completion (without the prompt) per prompt.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

SAMPLING_PARAMS = ("temperature", "top_k", "top_p", "max_new_tokens", "seed")


class TextGenerationModel(PythonModel):
    """Runs :class:`openllm.runtime.OnnxGenerator` on the export logged with the model."""

    def load_context(self, context) -> None:
        from openllm.runtime import OnnxGenerator

        self.generator = OnnxGenerator.load(context.artifacts["export"])

    def predict(self, context, model_input, params=None):  # MLflow's signature, untyped on purpose
        prompts = _prompts(model_input)
        settings = {k: v for k, v in (params or {}).items() if k in SAMPLING_PARAMS}
        sampling = self.generator.sampling(**settings)
        return [result.text for result in self.generator.generate_batch(prompts, sampling)]


def _prompts(model_input: Any) -> list[str]:
    """The prompts of a DataFrame (column ``prompt``, else the first), a dict or a list."""
    if hasattr(model_input, "columns"):  # what MLflow passes once the signature is applied
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        cells = list(model_input[column])
    elif isinstance(model_input, dict):
        cells = [model_input.get("prompt", [])]
    else:
        cells = [model_input]
    prompts: list[str] = []
    for cell in cells:  # a cell may hold several prompts ({"prompt": [...]} becomes one row)
        prompts += [cell] if isinstance(cell, str) else [str(p) for p in cell]
    return prompts


mlflow.models.set_model(TextGenerationModel())
