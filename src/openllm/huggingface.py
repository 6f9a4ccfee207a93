"""The export's Hugging Face folder (``hf/``): a ``LlamaForCausalLM`` that transformers 4 and 5 load.

A model with ``model.qk_norm`` (and no other lever) is a ``Qwen3ForCausalLM`` instead: Qwen3 is
the Llama layout plus an RMSNorm on each head's query and key before the rotary embedding,
which is what ``qk_norm`` adds.

Written by :mod:`openllm.export` and checked there against the PyTorch model: config and
generation config, safetensors weights (a pure rename, see :func:`openllm.model.hf_weight_names`),
``tokenizer.json`` equal to our SentencePiece model, a tokenizer config both transformers 4.x
and 5.x read (``PreTrainedTokenizerFast``: it loads ``tokenizer.json`` as written), a pad
token with left padding for batched generation, and a model card.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .sampling import Sampling
from .errors import OpenLLMError
from .model import GPT, hf_weight_names
from .tokenizer import BOS_ID, EOS_ID, UNK_ID

HF_DIR = "hf"


def hf_architecture(config) -> str | None:
    """The transformers class that computes what our model does, or None when there is none."""
    levers = config.levers()
    if not levers:
        return "LlamaForCausalLM"
    return "Qwen3ForCausalLM" if levers == {"qk_norm": True} else None


def hf_unsupported(config) -> str | None:
    """Why a model has no Hugging Face equivalent (its research levers, by field), or None when it has one."""
    if hf_architecture(config):
        return None
    named = ", ".join(f"model.{name}={value}" for name, value in config.levers().items())
    return f"{named} has no LlamaForCausalLM or Qwen3ForCausalLM equivalent"
MAX_ABS_DIFF = 1e-4  # transformers vs our logits
LICENSE = "gpl-3.0"  # the project's license (GPL-3.0-only), for the model card


class HuggingFaceError(OpenLLMError, RuntimeError):
    """The Hugging Face folder cannot be written or does not match the PyTorch model."""


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
        raise HuggingFaceError("the Hugging Face and onnxruntime-genai tokenizers need a BPE tokenizer "
                               "(tokenizer.model_type: bpe); set export.huggingface and export.genai to false "
                               "for a unigram one")
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


def tokenizer_config(context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for transformers 4.x, 5.x and onnxruntime-genai."""
    return {
        # Loads tokenizer.json as written in every version; LlamaTokenizer would rebuild its
        # own pipeline (with a "▁" prefix), and transformers 5's TokenizersBackend is unknown to 4.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "</s>",  # no pad piece in the vocabulary; padded positions are masked anyway
        "padding_side": "left",  # batched generation continues each prompt at its end
        "add_bos_token": False, "add_eos_token": False,  # our training text has no BOS
        "split_special_tokens": True,  # "<s>" typed in a prompt is text, as in SentencePiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }


def write_tokenizer_files(tokenizer_path: Path, folder: Path, context_length: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    hf_tokenizer(tokenizer_path).save(str(folder / "tokenizer.json"))
    text = json.dumps(tokenizer_config(context_length), indent=2) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")


def write_hf_folder(model: GPT, tokenizer_path: Path, folder: Path, sampling: Sampling,
                    card_facts: dict[str, Any]) -> None:
    """A ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM``) folder: config, generation config, weights,
    tokenizer, model card."""
    import transformers
    from safetensors.torch import save_file

    c = model.config
    architecture = hf_architecture(c)
    if architecture is None:
        raise HuggingFaceError(hf_unsupported(c))
    folder.mkdir()
    shape = dict(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        head_dim=c.head_dim, max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        architectures=[architecture], dtype="float32",
    )
    if architecture == "Qwen3ForCausalLM":
        transformers.Qwen3Config(**shape, use_sliding_window=False).save_pretrained(folder)
    else:
        transformers.LlamaConfig(**shape, mlp_bias=False).save_pretrained(folder)
    transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=sampling.temperature > 0,
        temperature=sampling.temperature or None, top_k=sampling.top_k or None, top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
    ).save_pretrained(folder)
    # Tied weights: transformers expects only the embedding and re-ties lm_head itself.
    names = hf_weight_names(c.n_layer, c.qk_norm)
    weights = {names[k]: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    write_tokenizer_files(tokenizer_path, folder, c.context_length)
    (folder / "README.md").write_text(model_card(model, sampling, card_facts), encoding="utf-8")


def model_card(model: GPT, sampling: Sampling, facts: dict[str, Any]) -> str:
    """The folder's README.md: what the model is, how it was trained and scored, its limits."""
    c = model.config

    def figure(key: str, fmt: str) -> str:
        value = facts.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "not measured"

    layout_extra = ", an RMSNorm on each head's query and key as in Qwen3" if c.qk_norm else ""

    return f"""---
license: {LICENSE}
library_name: transformers
pipeline_tag: text-generation
tags: [openllm, {"qwen3" if c.qk_norm else "llama"}, onnx]
---

# OpenLLM checkpoint, step {facts.get('step', '?')}

A small decoder-only language model trained from scratch with OpenLLM, in the Llama layout
(RMSNorm, rotary embeddings, SwiGLU, tied embeddings{layout_extra}), so transformers loads it as
`{hf_architecture(c)}`.

| | |
|---|---|
| parameters | {model.num_parameters():,} |
| layers x heads x width | {c.n_layer} x {c.n_head} x {c.n_embd} |
| context | {c.context_length} tokens |
| vocabulary | {c.vocab_size} SentencePiece BPE pieces (lossless: no normalisation, byte fallback) |
| training | {facts.get('step', '?')} steps, {figure('tokens_seen', ',')} tokens |
| training data | sha256 {facts.get('data_sha256', 'unknown')} (see the project's params.yaml `data`) |
| validation loss | {figure('val_loss', '.4f')} nats/token |
| validation bits per byte | {figure('val_bits_per_byte', '.4f')} |

## Use

```python
from transformers import pipeline

generate = pipeline("text-generation", model="path/to/this/folder")
print(generate("ROMEO:\\n", max_new_tokens=48)[0]["generated_text"])
```

Sampling defaults (`generation_config.json`): temperature {sampling.temperature}, top-k
{sampling.top_k}, top-p {sampling.top_p}, {sampling.max_new_tokens} new tokens. The text has
no beginning-of-text token: prompts are encoded without one.

## Limitations

A research and teaching model: it is small and trained on little text, so it writes text in
the style of its training data, without knowledge or reliability. It was not trained to
follow instructions and was not checked for harmful output. Do not use it for decisions.

## License

GPL-3.0-only, the license of the OpenLLM code that trained it.
"""


@torch.no_grad()
def check_hf_folder(folder: Path, model: GPT, tokenizer, texts: list[str]) -> dict[str, Any]:
    """Load the folder with transformers: all weights used, same logits, same token ids."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise HuggingFaceError(f"{folder}: transformers reports weight problems {problems}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in texts:
        want, got = tokenizer.encode(text), hf_tok.encode(text, add_special_tokens=False)
        if got != want:
            raise HuggingFaceError(f"{folder}: the transformers tokenizer gives other ids for {text[:40]!r}")
    ids = torch.tensor([tokenizer.encode(texts[0])[: model.config.context_length]])
    diff = float((hf_model.eval()(ids).logits.float() - model(ids)[0]).abs().max())
    if not diff <= MAX_ABS_DIFF:
        raise HuggingFaceError(f"{folder}: transformers logits differ by {diff:.3g} (allowed {MAX_ABS_DIFF})")
    return {"folder": HF_DIR, "max_abs_diff_logits": diff, "tokenizer_texts_checked": len(texts),
            "transformers": version("transformers")}
