"""The research levers, each off by default: QK-norm, logit soft-capping, the ReLU-squared MLP and
value embeddings (openllm.model), the weight average (openllm.ema, ``train.ema_decay``) and windows
that start at document boundaries (openllm.windows, ``train.window_start``).

Each lever is checked for what it computes, that its setting is validated with a message naming
the field, that the exports handle it (ONNX matches PyTorch; no Hugging Face folder, with the
reason logged), and, for the weight average, that a resumed run stays bit-exact.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fixtures_export import build_tokenizer
from openllm import checkpoint as ckpt
from openllm.checkpoint import CheckpointMeta, save_checkpoint
from openllm.config import ExportConfig, ModelConfig, TrainConfig
from openllm.ema import WeightAverage
from openllm.export import export_checkpoint
from openllm.fileio import sha256_file
from openllm.huggingface import HF_DIR, hf_unsupported
from openllm.model import GPT, GPTConfig
from openllm.sampling import Sampling
from openllm.tokenizer import EOS_ID, load_tokenizer
from openllm.windows import DataTooShortError, WindowSampler
from test_train import Project, resumed_at, tokenized, train_log  # noqa: F401  (fixtures)

SHAPE = dict(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=16, intermediate_size=24)
LEVERS = dict(qk_norm=True, logit_softcap=5.0, mlp="relu2", value_embeds=True)


def model(seed: int = 0, **levers) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SHAPE, **levers)).eval()


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


# --- the model -----------------------------------------------------------------------------------


def test_levers_off_leave_the_llama_model_unchanged() -> None:
    default = model()
    names = set(default.state_dict())
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert "layers.0.mlp.gate_proj.weight" in names
    assert default.config.levers() == {} and hf_unsupported(default.config) is None
    assert set(default.config.to_dict()) == set(SHAPE) | {"rope_theta", "norm_eps"}  # config.json as before


def test_config_round_trips_and_old_configs_load() -> None:
    config = GPTConfig(**SHAPE, **LEVERS)
    assert config.to_dict()["mlp"] == "relu2"
    assert GPTConfig.from_dict(config.to_dict()) == config
    old = GPTConfig.from_dict(dict(SHAPE))  # a checkpoint written before the levers existed
    assert (old.qk_norm, old.logit_softcap, old.mlp, old.value_embeds) == (False, None, "swiglu", False)


@pytest.mark.parametrize("field, value", [("qk_norm", "yes"), ("logit_softcap", 0.0), ("logit_softcap", True),
                                          ("mlp", "gelu"), ("value_embeds", 1)])
def test_bad_lever_values_are_refused_by_name(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        GPTConfig(**SHAPE, **{field: value})


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k() -> None:
    normed, plain = model(qk_norm=True), model()
    x = ids()
    before = normed(x)[0]
    with torch.no_grad():
        for m in (normed, plain):
            m.layers[0].attn.q_proj.weight.mul_(10.0)
            m.layers[0].attn.k_proj.weight.mul_(4.0)
    torch.testing.assert_close(normed(x)[0], before, rtol=1e-4, atol=1e-4)
    assert {n for n in normed.state_dict() if "norm" in n} >= {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"}
    plain_before = model()(x)[0]
    assert not torch.allclose(plain(x)[0], plain_before, atol=1e-3)  # without the norm the scale matters


def test_logit_softcap_is_cap_tanh_of_the_plain_logits() -> None:
    capped, plain = model(logit_softcap=0.05), model()
    plain.load_state_dict(capped.state_dict())
    x = ids()
    expected = 0.05 * torch.tanh(plain(x)[0] / 0.05)
    torch.testing.assert_close(capped(x)[0], expected)
    assert capped(x)[0].abs().max() < 0.05


def test_relu2_mlp_is_down_of_relu_up_squared_without_a_gate() -> None:
    m = model(mlp="relu2")
    mlp = m.layers[0].mlp
    assert not hasattr(mlp, "gate_proj")
    h = torch.randn(2, 3, SHAPE["n_embd"])
    expected = mlp.down_proj(torch.relu(mlp.up_proj(h)) ** 2)
    torch.testing.assert_close(mlp(h), expected)


def test_value_embeddings_add_a_gated_token_vector_to_every_layers_values() -> None:
    embedded, plain = model(value_embeds=True), model()
    assert not hasattr(plain, "value_embeddings")
    missing = embedded.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["layers.0.attn.ve_gate", "layers.1.attn.ve_gate", "value_embeddings.weight"]
    x = ids()
    assert not torch.allclose(embedded(x)[0], plain(x)[0], atol=1e-3)
    with torch.no_grad():
        for layer in embedded.layers:
            layer.attn.ve_gate.zero_()  # a closed gate leaves the plain model
    torch.testing.assert_close(embedded(x)[0], plain(x)[0])
    # A lookup table, like the input embedding: counted in the parameters, not in the FLOPs.
    table = SHAPE["vocab_size"] * SHAPE["n_embd"]
    assert embedded.num_parameters() == plain.num_parameters() + table + SHAPE["n_layer"]
    assert embedded.estimate_flops_per_token() == plain.estimate_flops_per_token() + 6 * SHAPE["n_layer"]


def test_kv_cache_decoding_matches_a_full_pass_with_every_lever() -> None:
    m, x = model(**LEVERS), ids(1, 10)
    full = m(x)[0]
    logits, cache = m(x[:, :6])
    steps = [logits]
    for t in range(6, 10):
        logits, cache = m(x[:, t:t + 1], past_key_values=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_model_settings_are_validated_by_field() -> None:
    assert ModelConfig().qk_norm is True and ModelConfig().logit_softcap is None and ModelConfig().mlp == "swiglu"
    for field, value in [("logit_softcap", 0), ("mlp", "gelu"), ("value_embeds", "yes")]:
        with pytest.raises(ValidationError, match=field):
            ModelConfig(**{field: value})
    for field, value in [("ema_decay", 1.0), ("ema_decay", 0), ("window_start", "line")]:
        with pytest.raises(ValidationError, match=field):
            TrainConfig(**{field: value})


# --- exports -------------------------------------------------------------------------------------


def lever_checkpoint(root: Path, levers: dict | None = None) -> Path:
    tokenizer_path = build_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=load_tokenizer(tokenizer_path).vocab_size(), context_length=64, n_layer=2,
                       n_head=4, n_embd=32, intermediate_size=64, **(LEVERS if levers is None else levers))
    m = GPT(config)
    with torch.no_grad():  # norm scales away from their initial ones, so that a wrong mapping shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    meta = CheckpointMeta(
        step=10, tokens_seen=1, train_loss=5.0, val_loss=5.0, parameters=m.num_parameters(), params_sha256="0" * 64,
        resume_key="test", learning_rates_sha256="0" * 64, data_sha256="0" * 64,
        tokenizer_sha256=sha256_file(tokenizer_path), bytes_per_token_val=3.0, threads=1, world_size=1,
        precision="fp32", compiled=False)
    return save_checkpoint(root / "checkpoints" / "step-10", m, tokenizer_path, meta=meta)


def test_export_of_a_lever_model_checks_onnx_and_skips_hugging_face(tmp_path: Path, caplog) -> None:
    checkpoint = lever_checkpoint(tmp_path)
    assert ckpt.load_model(checkpoint).config.levers() == LEVERS  # the checkpoint carries them
    caplog.set_level(logging.WARNING, logger="openllm.export")
    out = tmp_path / "export"
    report = export_checkpoint(checkpoint, out, ExportConfig(register_model=False),
                               Sampling(), None)
    assert report["verification"]["max_abs_diff_logits"] <= 1e-4  # the export raises otherwise
    assert "int8" in report and "genai" in report  # the quantised model and onnxruntime-genai work too
    reason = ("model.qk_norm=True, model.logit_softcap=5.0, model.mlp=relu2, model.value_embeds=True has no "
              "LlamaForCausalLM or Qwen3ForCausalLM equivalent")
    assert report["huggingface"] == {"skipped": reason}
    assert not (out / HF_DIR).exists()
    assert f"export.huggingface skipped: {reason}" in caplog.text


def test_a_qk_norm_model_exports_as_qwen3_for_transformers(tmp_path: Path) -> None:
    """QK-norm alone is Qwen3's attention: the Hugging Face folder is a Qwen3ForCausalLM, checked by the export."""
    import transformers

    checkpoint = lever_checkpoint(tmp_path, {"qk_norm": True})
    out = tmp_path / "export"
    report = export_checkpoint(checkpoint, out, ExportConfig(register_model=False, quantize=False, genai=False),
                               Sampling(), None)
    assert report["huggingface"]["max_abs_diff_logits"] <= 1e-4  # transformers' logits against ours
    config = transformers.AutoConfig.from_pretrained(out / HF_DIR)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.model_type == "qwen3"
    card = (out / HF_DIR / "README.md").read_text(encoding="utf-8")
    assert "`Qwen3ForCausalLM`" in card and "qwen3" in card
    model = ckpt.load_model(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / HF_DIR).eval()
    ids = torch.tensor([[5, 9, 2, 30, 7]])
    with torch.no_grad():
        want = [int(t) for t in generate_greedy(model, ids, 8)]
        got = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 5:].tolist()
    assert got == want
    with torch.no_grad():  # without its norms, Qwen3 computes something else: the check above can fail
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
        assert not torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-3)


def generate_greedy(model: GPT, ids: torch.Tensor, new: int) -> list[int]:
    out = []
    for _ in range(new):
        token = model(ids)[0][0, -1].argmax()
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


# --- windows at document boundaries ---------------------------------------------------------------


def test_document_windows_start_after_an_end_of_text() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 50, 5000).astype(np.uint16)
    tokens[rng.choice(5000, 40, replace=False)] = EOS_ID
    sampler = WindowSampler(tokens, 32, seed=3, start="document")
    starts = sampler.next_starts(256).numpy()
    assert all(s == 0 or tokens[s - 1] == EOS_ID for s in starts)
    assert starts.max() < len(tokens) - 33 and len(set(starts.tolist())) > 10


def test_random_windows_are_what_they_were() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    got = WindowSampler(tokens, 16, seed=5).next_starts(8)
    assert torch.equal(got, torch.randint(0, 1000 - 17, (8,), generator=torch.Generator().manual_seed(5)))


def test_document_windows_leave_room_for_a_whole_window() -> None:
    tokens = np.full(100, 7, dtype=np.uint16)
    tokens[[40, 95]] = EOS_ID  # the start after position 95 leaves no room for a window
    starts = WindowSampler(tokens, 16, 0, "document").next_starts(64).tolist()
    assert set(starts) == {0, 41}


# --- the weight average -------------------------------------------------------------------------


def test_weight_average_follows_its_formula_and_stands_in_only_while_applied() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)
    w0 = layer.weight.detach().clone()
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.add_(1.0)
    average.update(step=100)  # past the warmup: decay 0.5
    torch.testing.assert_close(average.average["weight"], w0 + 0.5, rtol=0, atol=1e-7)
    average.update(step=1)  # warming up: decay (1 + 1) / (10 + 1)
    torch.testing.assert_close(average.average["weight"], (w0 + 0.5) * 2 / 11 + (w0 + 1) * 9 / 11)
    live = layer.weight.detach().clone()
    with average.applied():
        assert torch.equal(layer.weight, average.average["weight"])
    assert torch.equal(layer.weight, live)


def test_ema_checkpoints_hold_the_average_and_a_resumed_run_is_bit_exact(
        tmp_path: Path, tokenized: Path, monkeypatch, train_log) -> None:  # noqa: F811  (imported fixtures)
    project, plain = Project(tmp_path / "ema", tokenized), Project(tmp_path / "plain", tokenized)
    plain.train(monkeypatch, ema_decay=None)  # the average off (on by default)
    project.train(monkeypatch, ema_decay=0.9)
    full = project.weights()
    assert full["step-20"] != plain.weights()["step-20"]
    state = ckpt.load_training_state(project.step(20))
    saved = ckpt.load_model(project.step(20)).state_dict()
    assert not torch.equal(saved["norm.weight"], state["ema"]["live_weights"]["norm.weight"])  # average != live
    for name in ("step-20", ckpt.DECAY_START):  # what is left to resume from is step 10
        shutil.rmtree(project.ck / name)
    train_log.clear()
    project.train(monkeypatch, ema_decay=0.9)
    assert resumed_at(train_log.text) == ("step-10", 10)
    assert project.weights() == full
