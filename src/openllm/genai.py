"""onnxruntime-genai model folders for an export: ``genai_config.json`` plus tokenizer files.

onnxruntime-genai (``onnxruntime_genai.Model(folder)``) reads the model's shape, its input and
output names, the special token ids and the default search from ``genai_config.json``, and its
tokenizer from ``tokenizer.json`` / ``tokenizer_config.json`` in the same folder. The export
folder itself is the fp32 model; ``int8/`` holds the int8 model with its own config (the
config may not point outside its folder). The ONNX graph already follows genai's naming
(``past_key_values.N.key`` in, ``present.N.key`` out); the cache grows by concatenation, so
past and present do not share a buffer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import OpenLLMError
from .fileio import write_json
from .genai_engine import GENAI_CONFIG, INT8_DIR
from .huggingface import write_tokenizer_files


class GenaiError(OpenLLMError, RuntimeError):
    """onnxruntime-genai cannot load a folder or does not generate what our runtime does."""


def genai_config(model_file: str, shape: dict[str, int], sampling: dict[str, Any],
                 special: dict[str, int]) -> dict[str, Any]:
    """The config of one variant.

    ``shape``: n_layer, n_head, head_dim, n_embd, context_length, vocab_size; ``special``:
    bos_id, eos_id; ``sampling``: the export's defaults (temperature 0 means greedy).
    """
    greedy = sampling["temperature"] == 0
    return {
        "model": {
            "type": "llama",
            "bos_token_id": special["bos_id"],
            "eos_token_id": special["eos_id"],
            "pad_token_id": special["eos_id"],
            "context_length": shape["context_length"],
            "vocab_size": shape["vocab_size"],
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": shape["head_dim"],
                "hidden_size": shape["n_embd"],
                "num_attention_heads": shape["n_head"],
                "num_key_value_heads": shape["n_head"],
                "num_hidden_layers": shape["n_layer"],
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": not greedy,
            "temperature": 1.0 if greedy else sampling["temperature"],
            "top_k": sampling["top_k"] or shape["vocab_size"],  # our 0 means off
            "top_p": sampling["top_p"],
            "max_length": shape["context_length"],  # prompt plus new tokens
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "early_stopping": True,
        },
    }


def write_genai_folders(folder: Path, tokenizer_path: Path, manifest: dict[str, Any]) -> list[str]:
    """Make ``folder`` (and ``folder/int8`` when the manifest has an int8 model) genai folders.

    The int8 model file moves into ``int8/``; returns the files written, relative to ``folder``.
    """
    shape = {k: manifest[k] for k in ("n_layer", "n_head", "head_dim", "n_embd", "context_length", "vocab_size")}
    special = {k: manifest[k] for k in ("bos_id", "eos_id")}
    written = []
    variants = [(folder, manifest["files"]["model"])]
    if manifest["files"].get("model_int8"):
        variants.append((folder / INT8_DIR, Path(manifest["files"]["model_int8"]).name))
    for target, model_file in variants:
        target.mkdir(exist_ok=True)
        write_json(target / GENAI_CONFIG, genai_config(model_file, shape, manifest["sampling"], special))
        write_tokenizer_files(tokenizer_path, target, shape["context_length"])
        written += [str((target / name).relative_to(folder))
                    for name in (GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json")]
    return written


def move_int8(folder: Path, int8_file: str) -> str:
    """Move the int8 model into ``int8/`` (its genai folder); return its new relative path."""
    (folder / INT8_DIR).mkdir(exist_ok=True)
    shutil.move(folder / int8_file, folder / INT8_DIR / int8_file)
    return f"{INT8_DIR}/{int8_file}"


def check_genai_folders(folder: Path, prompt_ids: list[int], new_tokens: int = 32) -> dict[str, Any]:
    """Load each genai folder with onnxruntime-genai: same tokens and same greedy ids as our runtime.

    Compared with :class:`openllm.runtime.OnnxGenerator` on the same ONNX file, so a wrong
    name, size or special id in a config shows up as different tokens.
    """
    import onnxruntime_genai as og

    from .runtime import OnnxGenerator
    from .sampling import Sampling

    figures: dict[str, Any] = {"onnxruntime_genai": og.__version__}
    for target, quantized in ((folder, False), (folder / INT8_DIR, True)):
        if not (target / GENAI_CONFIG).is_file():
            continue
        ours = OnnxGenerator.load(folder, quantized=quantized)
        n = min(new_tokens, ours.context_length - len(prompt_ids))
        want = ours.generate_tokens([prompt_ids], Sampling(temperature=0.0, max_new_tokens=n))[0].token_ids
        model = og.Model(str(target))
        text = ours.tokenizer.decode(prompt_ids)
        if list(og.Tokenizer(model).encode(text)) != ours.encode(text):
            raise GenaiError(f"{target}: onnxruntime-genai's tokenizer gives other ids than tokenizer.model")
        got = genai_greedy(model, prompt_ids, n, ours.eos_id)
        if got != want:
            raise GenaiError(f"{target}: onnxruntime-genai's greedy tokens differ: {got} vs {want}")
        figures["int8" if quantized else "fp32"] = {"greedy_tokens_equal": len(want)}
    return figures


def genai_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy ids with onnxruntime-genai (the end-of-text id not included), as our runtime returns them."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    ids: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token == eos_id:
            break
        ids.append(token)
    return ids
