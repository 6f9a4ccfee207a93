"""The ``export`` stage: one checkpoint -> a folder that runs without PyTorch or this repo.

``models/export/step-N/`` holds:

- ``model.onnx`` — one self-contained file with a KV cache, named like Hugging Face Optimum /
  onnxruntime-genai models: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``. Batch,
  sequence and cache lengths are dynamic; the first call passes empty caches.
- ``tokenizer.model`` and ``config.json`` (the typed manifest, :mod:`openllm.manifest`: shape,
  files, checksums, default sampling, the evaluate stage's figures) — what
  :class:`openllm.runtime.OnnxGenerator`, the server and the app read.
- ``genai_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` (``export.genai``) — the
  folder is an onnxruntime-genai model (:mod:`openllm.genai`).
- ``int8/model.int8.onnx`` (``export.quantize``) — weights dynamically quantised to int8, with
  its own onnxruntime-genai files (``model.int8.onnx`` at the top without ``export.genai``).
- ``export.json`` — what was measured: ONNX vs PyTorch logit differences, greedy agreement
  (onnxruntime, onnxruntime-genai), int8 quality and speed, the Hugging Face checks, the MLflow
  model version.
- ``hf/`` (``export.huggingface``) — a folder transformers 4 and 5 load as ``LlamaForCausalLM``
  (``Qwen3ForCausalLM`` with ``model.qk_norm``; :mod:`openllm.huggingface`).

Every check fails loudly with :class:`ExportError`; the folder is written atomically, so a
failed export leaves nothing behind. With ``export.register_model`` the folder is logged to the
checkpoint's MLflow training run as a text-generation model and registered (:mod:`openllm.registry`).
"""

from __future__ import annotations

import math
import logging
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import registry, tracking
from .config import ExportConfig, MlflowConfig
from .decode import left_pad
from .errors import OpenLLMError
from .fileio import atomic_dir, read_json, sha256_file, write_json
from .inspection import ATTENTION_FILE, export_attention_onnx
from .genai import check_genai_folders, move_int8, write_genai_folders
from .huggingface import HF_DIR, check_hf_folder, hf_unsupported, write_hf_folder
from .manifest import EVALUATION_KEYS, ExportManifest
from .model import GPT
from .onnx_export import export_program
from .runtime import OnnxGenerator, input_names, output_names
from .sampling import Sampling
from .tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer
from .torch_generate import generate_ids

log = logging.getLogger("openllm.export")
MODEL_FILE, INT8_FILE, EXPORT_JSON = "model.onnx", "model.int8.onnx", "export.json"
MAX_ABS_DIFF = 1e-4  # fp32 ONNX vs PyTorch logits
DECODE_STEPS, GREEDY_TOKENS = 16, 64
EXAMPLE_PROMPT = "ROMEO:\n"  # the registered model's input example
# Scored when no validation tokens are given (int8 quality), and the start of the checks.
FALLBACK_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
    "Ship the model, then measure it again: numbers drift when nobody looks.\n"
)
# Strings on which the Hugging Face tokenizer must give SentencePiece's ids.
TOKENIZER_PROBES = [
    "Hello, world!\n", "  two  spaces,\tone tab\n\n\nthree newlines", " leading space", "trailing  ",
    "Café, crème brûlée, déjà vu", "東京は日本の首都です。", "emoji 🙂🚀🎉", "<s> and </s> are text here",
    "digits 1234567890", "",
]


class ExportError(OpenLLMError, RuntimeError):
    """The export cannot be written or does not behave like the PyTorch model."""


# --- ONNX -----------------------------------------------------------------------------------


class _FlatInputs(nn.Module):
    """GPT with the ONNX calling convention: named tensors in, logits and new cache out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.model(input_ids, past_key_values, position_ids, attention_mask)
        return logits, present


def export_onnx(model: GPT, path: Path, opset: int) -> None:
    """Write ``model`` as one ONNX file with a KV cache (dynamo exporter, dynamic shapes)."""
    cfg = model.config
    # Example inputs: every dynamic size >= 2, so that the exporter does not specialise on it.
    B, T, P = 2, 3, 4
    example = dict(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, P + T, dtype=torch.long),
        position_ids=torch.arange(P, P + T).expand(B, T).contiguous(),
        past_key_values=[(torch.zeros(B, cfg.n_head, P, cfg.head_dim), torch.zeros(B, cfg.n_head, P, cfg.head_dim))
                         for _ in range(cfg.n_layer)],
    )
    Dim = torch.export.Dim
    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    cache = {0: batch, 2: past}
    dynamic_shapes = dict(  # nested like the inputs, the cache included
        input_ids={0: batch, 1: seq},
        attention_mask={0: batch, 1: total},  # = past + sequence (the exporter cannot state sums)
        position_ids={0: batch, 1: seq},
        past_key_values=[(cache, cache) for _ in range(cfg.n_layer)],
    )
    proto = export_program(_FlatInputs(model), (), ExportError, kwargs=example, dynamic_shapes=dynamic_shapes,
                           input_names=input_names(cfg.n_layer), output_names=output_names(cfg.n_layer),
                           opset_version=opset)
    # Name the mask length the way the present outputs name it.
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "past_sequence + sequence"
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_onnx(path: Path, n_layer: int, opset: int) -> None:
    """The ONNX checker, the input/output names and a single self-contained file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path}: the ONNX checker rejects it ({exc})") from None
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError(f"{path}: has external data; it must be one file")
    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if names != (input_names(n_layer), output_names(n_layer)):
        raise ExportError(f"{path}: unexpected input/output names {names}")
    got_opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got_opset < opset:
        raise ExportError(f"{path}: opset {got_opset} is below the requested {opset}")


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights.

    ``quant_pre_process`` first (ORT's graph optimisation + shape inference): without it the
    quantised model with a tied embedding/head ran slower than fp32. Symbolic shape inference
    is skipped: it cannot follow the dynamic cache lengths, and ONNX's own suffices.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name("prepared.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    except Exception as exc:
        raise ExportError(f"int8 quantisation failed ({exc})") from None
    finally:
        prepared.unlink(missing_ok=True)


# --- checks against PyTorch ------------------------------------------------------------------


@torch.no_grad()
def compare_logits(model: GPT, generator: OnnxGenerator, prompt_ids: list[int]) -> float:
    """Max |logits| difference over a prefill and 16 decode steps, batch 2, left-padded.

    Both sides get identical inputs (PyTorch's greedy tokens) from an empty cache.
    """
    ids, mask, positions = left_pad([prompt_ids, prompt_ids[: max(1, len(prompt_ids) // 2)]])  # as the decode loop pads
    past_ort = generator.empty_past(2)
    past_pt = None
    worst = 0.0
    for step in range(DECODE_STEPS + 1):
        got, past_ort = generator.forward(ids, mask, positions, past_ort)
        want, past_pt = model(torch.from_numpy(ids), past_pt, torch.from_numpy(positions), torch.from_numpy(mask))
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
        ids = want[:, -1].argmax(-1, keepdim=True).numpy()
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return worst


def check_against_torch(model: GPT, generator: OnnxGenerator, prompt_ids: list[int]) -> dict[str, Any]:
    """Logits within MAX_ABS_DIFF and the same greedy tokens, or ExportError."""
    diff = compare_logits(model, generator, prompt_ids)
    if not diff <= MAX_ABS_DIFF:  # also catches NaN
        raise ExportError(f"ONNX logits differ from PyTorch by {diff:.3g} (allowed {MAX_ABS_DIFF})")
    n = min(GREEDY_TOKENS, model.config.context_length - len(prompt_ids))
    greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n, seed=0)
    want = generate_ids(model, prompt_ids, greedy, eos_id=EOS_ID)
    got = generator.generate_tokens([prompt_ids], greedy)[0].token_ids
    if got != want:
        raise ExportError(f"greedy tokens differ between onnxruntime and PyTorch: {got} vs {want}")
    return {"max_abs_diff_logits": diff, "decode_steps_compared": DECODE_STEPS, "greedy_tokens_equal": len(want)}


def _decode_speed(generator: OnnxGenerator, prompt_ids: list[int]) -> float:
    """Greedy decoding speed, tokens per second (best of 3)."""
    n = min(GREEDY_TOKENS, generator.context_length - len(prompt_ids))
    greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n, seed=0)
    generator.generate_tokens([prompt_ids], greedy)  # warm-up
    return max(generator.generate_tokens([prompt_ids], greedy)[0].tokens_per_second for _ in range(3))


def compare_int8(fp32: OnnxGenerator, int8: OnnxGenerator, tokens: np.ndarray, prompt_ids: list[int]) -> dict[str, Any]:
    """Quality (loss, bits per byte) and decode speed of the int8 model against fp32."""
    n_bytes = fp32.count_bytes(tokens.tolist())
    figures: dict[str, Any] = {"scored_tokens": int(len(tokens) - 1), "scored_bytes": n_bytes}
    for name, generator in (("fp32", fp32), ("int8", int8)):
        total, count = generator.score_ids(tokens)
        figures[f"loss_{name}"] = total / count
        figures[f"bits_per_byte_{name}"] = total / (math.log(2) * max(1, n_bytes))
        figures[f"decode_tokens_per_second_{name}"] = _decode_speed(generator, prompt_ids)
    figures["bits_per_byte_change"] = figures["bits_per_byte_int8"] - figures["bits_per_byte_fp32"]
    figures["perplexity_change_percent"] = 100 * math.expm1(figures["loss_int8"] - figures["loss_fp32"])
    figures["decode_speedup"] = figures["decode_tokens_per_second_int8"] / figures["decode_tokens_per_second_fp32"]
    if not all(math.isfinite(v) for v in figures.values()):
        raise ExportError(f"the int8 model gives non-finite figures: {figures}")
    return figures


# --- the stage ------------------------------------------------------------------------------


def validation_tokens(tokenized_dir: Path, checkpoint_dir: Path, max_tokens: int = 1 << 15) -> np.ndarray | None:
    """The first validation tokens of ``data/tokenized``, if written with this checkpoint's tokenizer."""
    meta_path = Path(tokenized_dir) / "meta.json"
    tokenizer_path = Path(checkpoint_dir) / ckpt.TOKENIZER
    if not meta_path.is_file() or not tokenizer_path.is_file():  # export_checkpoint says what is missing
        return None
    meta = read_json(meta_path)
    if meta.get("tokenizer_sha256") != sha256_file(tokenizer_path):
        return None
    tokens = np.memmap(Path(tokenized_dir) / meta["val"]["file"], dtype=np.dtype(meta["dtype"]), mode="r")
    return np.asarray(tokens[:max_tokens], dtype=np.int64)


def export_checkpoint(
    checkpoint_dir: Path,
    out_dir: Path,
    cfg: ExportConfig,
    sampling: Sampling,
    mlflow_cfg: MlflowConfig | None,
    eval_tokens: np.ndarray | None = None,
    metrics_path: Path | None = None,
) -> dict[str, Any]:
    """Export one checkpoint into ``out_dir`` (atomically), check it, optionally register it.

    ``eval_tokens``: held-out ids for the int8 quality figures (else ``FALLBACK_TEXT``).
    ``metrics_path``: the evaluate stage's ``metrics/evaluate/step-N.json``: its figures go
    into the manifest, the model card and the registry tags. Returns what ``export.json`` holds.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    started = time.perf_counter()
    model = ckpt.load_model(checkpoint_dir)  # verifies every file's sha256
    tokenizer = load_tokenizer(checkpoint_dir / ckpt.TOKENIZER)
    evaluation = read_json(metrics_path) if metrics_path and Path(metrics_path).is_file() else {}
    c = model.config
    prompt_ids = tokenizer.encode(FALLBACK_TEXT)[: max(1, c.context_length // 4)]
    if eval_tokens is None or len(eval_tokens) < 2:
        eval_tokens = np.asarray(tokenizer.encode(FALLBACK_TEXT), np.int64)
    eval_tokens = np.asarray(eval_tokens, np.int64)[: 16 * c.context_length + 1]

    with atomic_dir(out_dir) as tmp:
        manifest = write_model_files(model, checkpoint_dir, tmp, cfg, sampling, evaluation)
        report: dict[str, Any] = {"step": manifest.step, "checkpoint": str(checkpoint_dir), "opset": cfg.opset,
                                  "torch": torch.__version__, "onnxruntime": version("onnxruntime")}
        fp32 = OnnxGenerator.load(tmp)  # the runtime users get, on the files just written
        report["verification"] = check_against_torch(model, fp32, prompt_ids)
        if cfg.quantize:
            int8 = OnnxGenerator.load(tmp, quantized=True)
            report["int8"] = compare_int8(fp32, int8, eval_tokens, prompt_ids)
        if cfg.genai:
            report["genai"] = check_genai_folders(tmp, prompt_ids)
        if cfg.huggingface and (skip := hf_unsupported(model.config)):
            log.warning("export.huggingface skipped: %s", skip)
            report["huggingface"] = {"skipped": skip}
        elif cfg.huggingface:
            write_hf_folder(model, checkpoint_dir / ckpt.TOKENIZER, tmp / HF_DIR, sampling, manifest.figures())
            report["huggingface"] = check_hf_folder(tmp / HF_DIR, model, tokenizer, [FALLBACK_TEXT, *TOKENIZER_PROBES])
        report["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                           if p.is_file() and HF_DIR not in p.relative_to(tmp).parts}
        write_json(tmp / EXPORT_JSON, reproducible(report))
        report["seconds"] = time.perf_counter() - started
        if cfg.register_model and mlflow_cfg is not None:
            report["mlflow"] = register(tmp, manifest, mlflow_cfg, cfg.opset,
                                        tracking.read_run_id(checkpoint_dir.parent))
        for path in tmp.rglob("*"):  # world-readable, whatever the writers' defaults were
            path.chmod(0o755 if path.is_dir() else 0o644)
    return report


def reproducible(report: dict[str, Any]) -> dict[str, Any]:
    """What ``export.json`` keeps of the report: facts a rebuild reproduces (no speeds, no registry).

    The export folder is a DVC output, so two builds must leave the same bytes; decode speeds and
    the MLflow version differ from run to run and go to the caller (the stage prints them).
    """
    kept = dict(report)
    if "int8" in kept:
        kept["int8"] = {k: v for k, v in kept["int8"].items() if "per_second" not in k and "speedup" not in k}
    return kept


def write_model_files(model: GPT, checkpoint_dir: Path, folder: Path, cfg: ExportConfig,
                      sampling: Sampling, evaluation: dict[str, Any]) -> ExportManifest:
    """ONNX model(s), tokenizer, manifest (config.json) and onnxruntime-genai configs into ``folder``."""
    c = model.config
    meta = ckpt.read_meta(checkpoint_dir)
    export_onnx(model, folder / MODEL_FILE, cfg.opset)
    check_onnx(folder / MODEL_FILE, c.n_layer, cfg.opset)
    export_attention_onnx(model, folder / ATTENTION_FILE, cfg.opset)  # for the app's Inspect page
    shutil.copyfile(checkpoint_dir / ckpt.TOKENIZER, folder / "tokenizer.model")
    int8_path = None
    if cfg.quantize:
        quantize_int8(folder / MODEL_FILE, folder / INT8_FILE)
        int8_path = move_int8(folder, INT8_FILE) if cfg.genai else INT8_FILE
    files = [MODEL_FILE, *([int8_path] if int8_path else []), "tokenizer.model"]
    manifest = ExportManifest(
        n_layer=c.n_layer, n_head=c.n_head, head_dim=c.head_dim, n_embd=c.n_embd,
        intermediate_size=c.intermediate_size, context_length=c.context_length, vocab_size=c.vocab_size,
        rope_theta=c.rope_theta, norm_eps=c.norm_eps, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        sampling=sampling.model_dump(),
        files={"model": MODEL_FILE, "model_int8": int8_path, "tokenizer": "tokenizer.model"},
        sha256={Path(name).name: sha256_file(folder / name) for name in files},
        opset=cfg.opset, inputs=input_names(c.n_layer), outputs=output_names(c.n_layer),
        step=meta.get("step"), val_loss=meta.get("val_loss"),
        checkpoint={"folder": checkpoint_dir.name, "meta": meta,
                    "sha256": read_json(checkpoint_dir / ckpt.COMPLETE)["sha256"]},
        evaluation={k: evaluation[k] for k in EVALUATION_KEYS if isinstance(evaluation.get(k), (int, float))},
    )
    manifest.write(folder)
    if cfg.genai:
        write_genai_folders(folder, checkpoint_dir / ckpt.TOKENIZER, manifest.to_dict())
    return manifest


def register(folder: Path, manifest: ExportManifest, mlflow_cfg: MlflowConfig, opset: int,
             run_id: str | None) -> dict[str, Any]:
    """Register the export as a version of ``mlflow.registered_model``, tagged with its figures."""
    figures = manifest.figures()
    tags = {"step": manifest.step, "val_loss": figures.get("val_loss"),
            "val_bits_per_byte": figures.get("val_bits_per_byte"),
            "checkpoint_sha256": manifest.checkpoint["sha256"][ckpt.WEIGHTS],
            "onnx_sha256": manifest.sha256[MODEL_FILE], "opset": opset}
    tracking.setup(mlflow_cfg.experiment)
    try:
        return registry.register_export(folder, run_id, mlflow_cfg.registered_model,
                                        {k: v for k, v in tags.items() if v is not None},
                                        EXAMPLE_PROMPT, manifest.sampling)
    except registry.RegistryError as exc:
        raise ExportError(str(exc)) from exc
