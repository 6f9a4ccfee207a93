"""The ``export`` stage: one checkpoint -> a folder that runs without PyTorch or this repo.

``models/export/step-N/`` holds:

- ``model.onnx`` — one self-contained file with a KV cache, named like Hugging Face Optimum /
  onnxruntime-genai models: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``. Batch,
  sequence and cache lengths are dynamic; the first call passes empty caches.
- ``model.int8.onnx`` (``export.quantize``) — weights dynamically quantised to int8.
- ``tokenizer.model`` and ``config.json`` — what :class:`openllm.runtime.OnnxGenerator` needs.
- ``export.json`` — what was measured: ONNX vs PyTorch logit differences, greedy agreement,
  int8 quality and speed, the Hugging Face checks, the MLflow model version.
- ``hf/`` (``export.huggingface``) — a folder ``transformers`` loads as ``LlamaForCausalLM``.

Every check fails loudly with :class:`ExportError`; the folder is written atomically, so a
failed export leaves nothing behind. With ``export.register_model`` the fp32 model (plus its
tokenizer and config) is logged to the checkpoint's MLflow training run and registered.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import ExportConfig, MlflowConfig, SamplingConfig
from .errors import OpenLLMError
from .fileio import atomic_dir, read_json, sha256_file, write_json
from .inspection import ATTENTION_FILE, export_attention_onnx
from .model import GPT, hf_weight_names
from .runtime import CONFIG_FILE, FORMAT, OnnxGenerator, input_names, output_names
from .sampling import Sampling
from .tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer
from .torch_generate import generate_ids

MODEL_FILE, INT8_FILE, EXPORT_JSON, HF_DIR = "model.onnx", "model.int8.onnx", "export.json", "hf"
MAX_ABS_DIFF = 1e-4  # fp32 ONNX vs PyTorch logits
DECODE_STEPS, GREEDY_TOKENS = 16, 64
ALIAS_NEWEST, ALIAS_BEST = "newest", "best"  # MLflow reserves the alias name "latest"
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
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))  # exporter chatter
            program = torch.onnx.export(
                _FlatInputs(model).eval(), (), kwargs=example, dynamic_shapes=dynamic_shapes,
                input_names=input_names(cfg.n_layer), output_names=output_names(cfg.n_layer),
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
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
    short = prompt_ids[: max(1, len(prompt_ids) // 2)]
    rows = [prompt_ids, short]
    L = len(prompt_ids)
    ids = np.zeros((2, L), np.int64)
    mask = np.zeros((2, L), np.int64)
    for i, row in enumerate(rows):
        ids[i, L - len(row):], mask[i, L - len(row):] = row, 1
    positions = np.maximum(mask.cumsum(1) - 1, 0)
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


# --- Hugging Face -------------------------------------------------------------------------


def hf_tokenizer(tokenizer_path: Path):
    """A ``tokenizers`` BPE equal to our SentencePiece model (no dummy prefix, byte fallback).

    SentencePiece BPE merges any two adjacent symbols whose concatenation is a piece, best
    score first; listing every such pair, ordered by the merged piece's score, makes the
    Hugging Face BPE do the same. Spaces become "▁" without a prefix; "\\n" (a user-defined
    symbol) is an added token, so it is never merged, just as in SentencePiece.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = spm_pb.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    kind = spm_pb.ModelProto.SentencePiece.Type
    if proto.trainer_spec.model_type != spm_pb.TrainerSpec.BPE:
        raise ExportError("the Hugging Face folder needs a BPE tokenizer (tokenizer.model_type: bpe); "
                          "set export.huggingface: false for a unigram one")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == kind.NORMAL}
    merges = sorted(
        (-proto.pieces[i].score, i, vocab[piece[:k]], vocab[piece[k:]])
        for piece, i in normal.items() for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    pieces = [p.piece for p in proto.pieces]
    tok = Tokenizer(models.BPE(
        vocab=vocab, merges=[(pieces[a], pieces[b]) for _, _, a, b in merges],
        unk_token=pieces[UNK_ID], byte_fallback=True, fuse_unk=True,
    ))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (kind.CONTROL, kind.UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == kind.USER_DEFINED])
    return tok


def write_hf_folder(model: GPT, tokenizer_path: Path, folder: Path, sampling: SamplingConfig) -> None:
    """A ``LlamaForCausalLM`` folder: config, generation config, weights, tokenizer files."""
    import transformers
    from safetensors.torch import save_file

    c = model.config
    folder.mkdir()
    transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        head_dim=c.head_dim, max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        architectures=["LlamaForCausalLM"], dtype="float32",
    ).save_pretrained(folder)
    transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=sampling.temperature > 0,
        temperature=sampling.temperature or None, top_k=sampling.top_k or None, top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
    ).save_pretrained(folder)
    # Tied weights: transformers expects only the embedding and re-ties lm_head itself.
    names = hf_weight_names(c.n_layer)
    weights = {names[k]: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    hf_tokenizer(tokenizer_path).save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        # TokenizersBackend loads tokenizer.json as written; LlamaTokenizer would rebuild
        # its own pipeline (with a "▁" prefix) instead.
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False,  # our training text has no BOS
        "split_special_tokens": True,  # "<s>" typed in a prompt is text, as in SentencePiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": c.context_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


@torch.no_grad()
def check_hf_folder(folder: Path, model: GPT, tokenizer, texts: list[str]) -> dict[str, Any]:
    """Load the folder with transformers: all weights used, same logits, same token ids."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportError(f"{folder}: transformers reports weight problems {problems}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in texts:
        want, got = tokenizer.encode(text), hf_tok.encode(text, add_special_tokens=False)
        if got != want:
            raise ExportError(f"{folder}: the transformers tokenizer gives other ids for {text[:40]!r}")
    ids = torch.tensor([tokenizer.encode(texts[0])[: model.config.context_length]])
    diff = float((hf_model.eval()(ids).logits.float() - model(ids)[0]).abs().max())
    if not diff <= MAX_ABS_DIFF:
        raise ExportError(f"{folder}: transformers logits differ by {diff:.3g} (allowed {MAX_ABS_DIFF})")
    return {"folder": HF_DIR, "max_abs_diff_logits": diff, "tokenizer_texts_checked": len(texts),
            "transformers": version("transformers")}


# --- MLflow ---------------------------------------------------------------------------------


def register_model(export_dir: Path, checkpoint_dir: Path, mlflow_cfg: MlflowConfig,
                   tags: dict[str, Any]) -> dict[str, Any]:
    """Log the fp32 model into the checkpoint's training run and register one version for it.

    ``tags`` (step, val_loss, val_bits_per_byte, checkpoint sha256...) go on the version.
    An older version of the same checkpoint (a re-export) is replaced, so there is one
    version per checkpoint. Then the aliases are recomputed over all versions: ``newest``
    (highest step) and ``best`` (lowest val_bits_per_byte, else lowest val_loss).
    """
    from mlflow.exceptions import MlflowException

    try:
        return _register(export_dir, checkpoint_dir, mlflow_cfg, tags)
    except MlflowException as exc:  # a store that cannot be reached or written, a bad name...
        raise ExportError(f"MLflow registration failed: {exc.message}") from exc


def _register(export_dir: Path, checkpoint_dir: Path, mlflow_cfg: MlflowConfig, tags: dict[str, Any]) -> dict[str, Any]:
    from . import tracking

    mlflow = tracking.setup(mlflow_cfg.experiment)
    client = mlflow.MlflowClient()
    name = mlflow_cfg.registered_model
    extra = [str(export_dir / f) for f in (CONFIG_FILE, "tokenizer.model", EXPORT_JSON, INT8_FILE)
             if (export_dir / f).is_file()]
    with tracking.open_run(mlflow, tracking.read_run_id(checkpoint_dir.parent)) as run:
        info = mlflow.onnx.log_model(
            onnx.load(str(export_dir / MODEL_FILE)), name=f"onnx-step-{tags['step']}",
            onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
            extra_files=extra, registered_model_name=name,
            pip_requirements=[f"onnxruntime=={version('onnxruntime')}", f"onnx=={version('onnx')}"],
        )
        run_id = run.info.run_id
    new_version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, new_version, key, str(value))
    for old in client.search_model_versions(f"name='{name}'"):
        if str(old.version) != new_version and old.tags.get("checkpoint_sha256") == tags["checkpoint_sha256"]:
            client.delete_model_version(name, old.version)
    aliases = _set_aliases(client, name)
    return {"registered_model": name, "version": int(new_version), "run_id": run_id,
            "model_uri": f"models:/{name}/{new_version}", "aliases": aliases}


def _set_aliases(client, name: str) -> dict[str, int]:
    """Point ``newest`` and ``best`` at the right versions of ``name``."""
    versions = []
    for v in client.search_model_versions(f"name='{name}'"):
        try:
            figures = {k: float(x) for k, x in v.tags.items() if k in ("step", "val_loss", "val_bits_per_byte")}
        except ValueError:  # a tag edited by hand
            continue
        versions.append((int(v.version), figures))
    versions = [v for v in versions if "step" in v[1]]
    aliases: dict[str, int] = {}
    if versions:
        aliases[ALIAS_NEWEST] = max(versions, key=lambda v: (v[1]["step"], v[0]))[0]
        key = "val_bits_per_byte" if all("val_bits_per_byte" in t for _, t in versions) else "val_loss"
        scored = [v for v in versions if key in v[1]]
        if scored:
            aliases[ALIAS_BEST] = min(scored, key=lambda v: (v[1][key], -v[0]))[0]
    for alias, number in aliases.items():
        client.set_registered_model_alias(name, alias, str(number))
    return aliases


# --- the stage ------------------------------------------------------------------------------


def validation_tokens(tokenized_dir: Path, checkpoint_dir: Path, max_tokens: int = 1 << 15) -> np.ndarray | None:
    """The first validation tokens of ``data/tokenized``, if written with this checkpoint's tokenizer."""
    meta_path = Path(tokenized_dir) / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    if meta.get("tokenizer_sha256") != sha256_file(Path(checkpoint_dir) / ckpt.TOKENIZER):
        return None
    tokens = np.memmap(Path(tokenized_dir) / meta["val"]["file"], dtype=np.dtype(meta["dtype"]), mode="r")
    return np.asarray(tokens[:max_tokens], dtype=np.int64)


def export_checkpoint(
    checkpoint_dir: Path,
    out_dir: Path,
    cfg: ExportConfig,
    sampling: SamplingConfig,
    mlflow_cfg: MlflowConfig | None,
    eval_tokens: np.ndarray | None = None,
    metrics_path: Path | None = None,
) -> dict[str, Any]:
    """Export one checkpoint into ``out_dir`` (atomically), check it, optionally register it.

    ``eval_tokens``: held-out ids for the int8 quality figures (else ``FALLBACK_TEXT``).
    ``metrics_path``: the evaluate stage's ``metrics/evaluate/step-N.json``, for the
    registry tags. Returns what ``export.json`` holds.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    started = time.perf_counter()
    model = ckpt.load_model(checkpoint_dir)  # verifies every file's sha256
    meta = ckpt.read_meta(checkpoint_dir)
    checksums = read_json(checkpoint_dir / ckpt.COMPLETE)["sha256"]
    evaluation = read_json(metrics_path) if metrics_path and Path(metrics_path).is_file() else {}
    tokenizer = load_tokenizer(checkpoint_dir / ckpt.TOKENIZER)
    c = model.config
    prompt_ids = tokenizer.encode(FALLBACK_TEXT)[: max(1, c.context_length // 4)]
    if eval_tokens is None or len(eval_tokens) < 2:
        eval_tokens = np.asarray(tokenizer.encode(FALLBACK_TEXT), np.int64)
    eval_tokens = np.asarray(eval_tokens, np.int64)[: 16 * c.context_length + 1]

    with atomic_dir(out_dir) as tmp:
        export_onnx(model, tmp / MODEL_FILE, cfg.opset)
        check_onnx(tmp / MODEL_FILE, c.n_layer, cfg.opset)
        export_attention_onnx(model, tmp / ATTENTION_FILE, cfg.opset)  # for the app's Inspect page
        shutil.copyfile(checkpoint_dir / ckpt.TOKENIZER, tmp / "tokenizer.model")
        if cfg.quantize:
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
        files = [MODEL_FILE, *([INT8_FILE] if cfg.quantize else []), "tokenizer.model"]
        config = {
            "format": FORMAT,
            "n_layer": c.n_layer, "n_head": c.n_head, "head_dim": c.head_dim, "n_embd": c.n_embd,
            "intermediate_size": c.intermediate_size, "context_length": c.context_length,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "norm_eps": c.norm_eps,
            "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
            "sampling": sampling.model_dump(),
            "step": meta.get("step"), "val_loss": meta.get("val_loss"),
            "checkpoint": {"folder": checkpoint_dir.name, "meta": meta, "sha256": checksums},
            "files": {"model": MODEL_FILE, "model_int8": INT8_FILE if cfg.quantize else None,
                      "tokenizer": "tokenizer.model"},
            "sha256": {name: sha256_file(tmp / name) for name in files},
            "opset": cfg.opset,
            "inputs": input_names(c.n_layer), "outputs": output_names(c.n_layer),
        }
        write_json(tmp / CONFIG_FILE, config)

        report: dict[str, Any] = {"step": meta.get("step"), "checkpoint": str(checkpoint_dir), "opset": cfg.opset,
                                  "torch": torch.__version__, "onnxruntime": version("onnxruntime")}
        fp32 = OnnxGenerator.load(tmp)  # the runtime users get, on the files just written
        report["verification"] = check_against_torch(model, fp32, prompt_ids)
        if cfg.quantize:
            int8 = OnnxGenerator.load(tmp, quantized=True)
            report["int8"] = compare_int8(fp32, int8, eval_tokens, prompt_ids)
        if cfg.huggingface:
            write_hf_folder(model, checkpoint_dir / ckpt.TOKENIZER, tmp / HF_DIR, sampling)
            report["huggingface"] = check_hf_folder(tmp / HF_DIR, model, tokenizer, [FALLBACK_TEXT, *TOKENIZER_PROBES])
        report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        report["seconds"] = time.perf_counter() - started
        write_json(tmp / EXPORT_JSON, report)

        if cfg.register_model and mlflow_cfg is not None:
            tags = {"step": meta.get("step"), "val_loss": evaluation.get("val_loss", meta.get("val_loss")),
                    "val_bits_per_byte": evaluation.get("val_bits_per_byte"),
                    "checkpoint_sha256": checksums[ckpt.WEIGHTS], "onnx_sha256": config["sha256"][MODEL_FILE],
                    "opset": cfg.opset}
            report["mlflow"] = register_model(tmp, checkpoint_dir, mlflow_cfg,
                                              {k: v for k, v in tags.items() if v is not None})
            write_json(tmp / EXPORT_JSON, report)
    return report
