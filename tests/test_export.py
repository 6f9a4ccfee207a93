"""Tests for openllm.export: the ONNX folder, its checks, int8, Hugging Face and the MLflow registry."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fixtures_export import CONTEXT, build_checkpoint, build_export
from helpers import TINY_DOCS, run_openllm
from openllm.checkpoint import CheckpointError, load_model
from openllm.config import ExportConfig
from openllm.errors import OpenLLMError
from openllm.export import ExportError, check_onnx, export_checkpoint
from openllm.manifest import ExportManifest
from openllm.fileio import read_json, sha256_file, write_json
from openllm.runtime import ModelLoadError, OnnxGenerator, input_names, output_names
from openllm.sampling import Sampling
from openllm.tokenizer import EOS_ID, load_tokenizer
from openllm.torch_generate import generate_ids


@pytest.fixture(scope="session")
def checkpoint(session_dir: Path) -> Path:
    return build_checkpoint(session_dir / "export-tests" / "checkpoints")


@pytest.fixture(scope="session")
def export_dir(session_dir: Path, checkpoint: Path) -> Path:
    return build_export(session_dir / "export-tests")


@pytest.fixture(scope="session")
def model(checkpoint: Path):
    return load_model(checkpoint)


@pytest.fixture(scope="session")
def generator(export_dir: Path) -> OnnxGenerator:
    return OnnxGenerator.load(export_dir)


# ---------------------------------------------------------------- the folder


def test_folder_contents_and_metadata(export_dir: Path, checkpoint: Path) -> None:
    names = {p.name for p in export_dir.iterdir()}
    assert names >= {"model.onnx", "int8", "tokenizer.model", "config.json", "export.json", "hf",
                     "genai_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in (export_dir / "int8").iterdir()} == {
        "model.int8.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"}
    config = read_json(export_dir / "config.json")
    assert config["n_layer"] == 2 and config["n_head"] == 4 and config["head_dim"] == 8
    assert config["context_length"] == CONTEXT and config["vocab_size"] == 400
    assert (config["bos_id"], config["eos_id"], config["unk_id"]) == (1, 2, 0)
    assert config["sampling"] == Sampling().model_dump()
    assert config["step"] == 10 and config["val_loss"] == 5.0 and config["opset"] == 18
    assert config["files"] == {"model": "model.onnx", "model_int8": "int8/model.int8.onnx", "tokenizer": "tokenizer.model"}
    assert ExportManifest.from_dict(config).checkpoint["meta"]["tokens_seen"] == 10 * 1024
    assert (export_dir / "tokenizer.model").read_bytes() == (checkpoint / "tokenizer.model").read_bytes()
    report = read_json(export_dir / "export.json")
    assert report["verification"]["max_abs_diff_logits"] <= 1e-4
    assert report["verification"]["greedy_tokens_equal"] > 0
    assert report["huggingface"]["max_abs_diff_logits"] <= 1e-4


def test_onnx_graph_names_types_and_dynamic_dims(export_dir: Path) -> None:
    proto = onnx.load(str(export_dir / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    assert list(inputs) == input_names(2) and list(outputs) == output_names(2)
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert dims(inputs["input_ids"]) == ["batch", "sequence"]
    assert dims(inputs["position_ids"]) == ["batch", "sequence"]
    assert dims(inputs["attention_mask"]) == ["batch", "past_sequence + sequence"]
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert inputs[name].type.tensor_type.elem_type == int64
    for i in range(2):
        for kv in ("key", "value"):
            past, present = inputs[f"past_key_values.{i}.{kv}"], outputs[f"present.{i}.{kv}"]
            assert past.type.tensor_type.elem_type == present.type.tensor_type.elem_type == float32
            assert dims(past) == ["batch", 4, "past_sequence", 8]
            assert dims(present) == ["batch", 4, "past_sequence + sequence", 8]
    assert dims(outputs["logits"]) == ["batch", "sequence", 400]
    # The tied embedding/head matrix is stored once.
    assert sum(list(t.dims) in ([400, 32], [32, 400]) for t in proto.graph.initializer) == 1


# ---------------------------------------------------------------- same numbers as PyTorch


@torch.no_grad()
def test_onnx_files_carry_no_source_paths(export_dir: Path) -> None:
    """The exporter's per-node stack traces name this checkout's folder: a rebuild elsewhere (a
    clone, CI) would write other bytes, so they are removed."""
    import onnx

    for name in ("model.onnx", "model.attention.onnx"):
        proto = onnx.load(str(export_dir / name))
        noted = [n.name for n in proto.graph.node if len(n.metadata_props)]
        assert not noted, (name, noted[:3])
        assert str(Path(__file__).resolve().parents[1]) not in proto.SerializeToString().decode("latin-1")


def test_logits_match_torch_prefill_and_16_decode_steps(model, generator: OnnxGenerator) -> None:
    rows = [list(range(5, 17)), list(range(40, 47))]  # lengths 12 and 7: row 1 is left-padded
    L = max(map(len, rows))
    ids = np.zeros((2, L), np.int64)
    mask = np.zeros((2, L), np.int64)
    for i, row in enumerate(rows):
        ids[i, L - len(row):], mask[i, L - len(row):] = row, 1
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    past_ort, past_pt, worst = generator.empty_past(2), None, 0.0
    for step in range(17):  # the prefill (empty cache) and 16 single-token steps
        got, past_ort = generator.forward(ids, mask, positions, past_ort)
        with torch.no_grad():
            want, past_pt = model(torch.from_numpy(ids), past_pt, torch.from_numpy(positions), torch.from_numpy(mask))
        assert got.shape == tuple(want.shape) and past_ort[0].shape == tuple(past_pt[0][0].shape)
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
        ids = want[:, -1].argmax(-1, keepdim=True).numpy()
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    assert past_ort[0].shape == (2, 4, L + 16, 8)
    assert worst <= 1e-4


def test_greedy_64_tokens_equal_torch(model, generator: OnnxGenerator) -> None:
    prompt = generator.encode("ROMEO:\nBut soft, what light")
    greedy = Sampling(temperature=0.0, max_new_tokens=64)
    want = generate_ids(model, prompt, greedy, eos_id=EOS_ID)
    got = generator.generate_tokens([prompt], greedy)[0]
    assert got.token_ids == want and len(want) > 0
    assert got.finish_reason == ("length" if len(want) == 64 else "stop")


# ---------------------------------------------------------------- failures are loud


def test_corrupt_or_missing_files_are_clear_errors(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxGenerator.load(tmp_path / "nowhere")

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (broken / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        OnnxGenerator.load(broken)

    (broken / "model.onnx").write_bytes(b"not an onnx model")  # and a config that agrees with it
    config = read_json(broken / "config.json")
    config["sha256"]["model.onnx"] = sha256_file(broken / "model.onnx")
    write_json(broken / "config.json", config)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxGenerator.load(broken)

    del config["sha256"]["model.onnx"]  # a missing checksum is refused like a wrong one
    write_json(broken / "config.json", config)
    with pytest.raises(ModelLoadError, match="no sha256 for model.onnx"):
        OnnxGenerator.load(broken)

    (broken / "config.json").unlink()
    with pytest.raises(OpenLLMError, match="config.json is missing"):
        OnnxGenerator.load(broken)


def test_missing_or_corrupt_checkpoint_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "step-10"
    with pytest.raises(CheckpointError, match="not found"):
        export_checkpoint(tmp_path / "missing", out, ExportConfig(), Sampling(), None)
    bad = tmp_path / "step-10"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OpenLLMError, match="corrupt"):
        export_checkpoint(bad, out, ExportConfig(), Sampling(), None)
    assert not out.exists() and not list((tmp_path / "export").glob(".*"))  # no temp folders left


def test_an_onnx_file_off_the_interface_is_refused_naming_the_file(export_dir: Path, tmp_path: Path) -> None:
    path = export_dir / "model.onnx"
    n_layer = read_json(export_dir / "config.json")["n_layer"]
    opset = max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    check_onnx(path, n_layer, opset)  # the export's own file passes
    # An OpenLLMError, so that the command line prints its one line instead of a traceback.
    with pytest.raises(OpenLLMError, match=f"opset {opset} is below the requested {opset + 1}"):
        check_onnx(path, n_layer, opset + 1)
    with pytest.raises(ExportError, match=r"model.onnx: unexpected input/output names"):
        check_onnx(path, n_layer + 1, opset)
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ExportError, match=re.escape(f"{garbage}: the ONNX checker rejects it")):
        check_onnx(garbage, n_layer, opset)


def test_unigram_tokenizer_names_the_switches_that_need_bpe(tmp_path: Path) -> None:
    from openllm.config import TokenizerConfig
    from openllm.huggingface import HuggingFaceError, hf_tokenizer
    from openllm.tokenizer import train_tokenizer

    unigram = tmp_path / "unigram.model"
    train_tokenizer([text * 20 for text in TINY_DOCS.values()], TokenizerConfig(vocab_size=340, model_type="unigram"),
                    unigram)
    with pytest.raises(HuggingFaceError, match="export.huggingface and export.genai to false"):
        hf_tokenizer(unigram)


# ---------------------------------------------------------------- int8


def test_int8_model_runs_and_is_measured(export_dir: Path, generator: OnnxGenerator) -> None:
    int8 = OnnxGenerator.load(export_dir, quantized=True)
    assert (export_dir / "int8" / "model.int8.onnx").stat().st_size < (export_dir / "model.onnx").stat().st_size
    text = TINY_DOCS["a_hello.txt"]
    assert abs(int8.score(text)["loss"] - generator.score(text)["loss"]) < 0.05
    result = int8.generate("Hello", Sampling(temperature=0.0, max_new_tokens=8))
    assert 0 < result.completion_tokens <= 8
    figures = read_json(export_dir / "export.json")["int8"]
    for key in ("bits_per_byte_fp32", "bits_per_byte_int8", "bits_per_byte_change", "perplexity_change_percent"):
        assert np.isfinite(figures[key]), key
    assert abs(figures["bits_per_byte_change"]) < 0.05


# ---------------------------------------------------------------- Hugging Face


def test_hf_folder_loads_with_transformers(export_dir: Path, model, checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = export_dir / "hf"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    config = read_json(folder / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights

    sp = load_tokenizer(checkpoint / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [*TINY_DOCS.values(), "a\nb\n\n  c   d\t", "naïve café 🙂 東京 漢字", "<s>tags</s> <unk> stay text",
             "  ", "\n", "x" * 30,
             "Zu\u0308rich \u00c5 A\u030a \ufb01"]  # NFD and NFC forms, a ligature: nothing is normalised
    for text in texts:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert hf_tok.decode(ids) == text

    ids = torch.tensor([sp.encode(TINY_DOCS["b_french.txt"])])
    with torch.no_grad():
        diff = (hf.eval()(ids).logits - model(ids)[0]).abs().max().item()
    assert diff <= 1e-4


def test_hf_folder_pads_generates_in_batches_and_has_a_card(export_dir: Path, checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = export_dir / "hf"
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (hf_tok.pad_token, hf_tok.pad_token_id, hf_tok.padding_side) == ("</s>", 2, "left")
    # tokenizer_class names a class transformers 4.x has too (5.x's TokenizersBackend is unknown there)
    assert read_json(folder / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    generation = read_json(folder / "generation_config.json")
    sampling = Sampling()
    assert (generation["temperature"], generation["top_k"], generation["top_p"], generation["max_new_tokens"]) == (
        sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_new_tokens)
    assert generation["pad_token_id"] == 2 and generation["do_sample"] is True

    # A batched pipeline needs the pad token; left padding keeps each prompt's greedy text.
    generate = transformers.pipeline("text-generation", model=str(folder), tokenizer=hf_tok)
    prompts = ["ROMEO:\nBut soft", "Hi"]
    batched = generate(prompts, max_new_tokens=6, do_sample=False, batch_size=2)
    alone = [generate(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in prompts]
    assert [r[0]["generated_text"] for r in batched] == alone

    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: gpl-3.0\n") and "pipeline_tag: text-generation" in card
    assert "## Limitations" in card and "| parameters |" in card and "step 10" in card
    for path in export_dir.rglob("*"):  # readable by every user (safetensors writes 0600 by default)
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


# ---------------------------------------------------------------- onnxruntime-genai


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_onnxruntime_genai_loads_each_variant_with_our_greedy_tokens(export_dir: Path, variant: str) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    folder = export_dir if variant == "fp32" else export_dir / "int8"
    ours = OnnxGenerator.load(export_dir, quantized=variant == "int8")  # what `openllm generate` runs
    model, greedy = og.Model(str(folder)), Sampling(temperature=0.0, max_new_tokens=40)
    tokenizer = og.Tokenizer(model)
    for prompt in ["ROMEO:\nBut soft, what light", "Hello", "Café 🙂 東京\n  two  spaces", "x"]:
        ids = ours.encode(prompt)
        assert list(tokenizer.encode(prompt)) == ids, prompt
        want = ours.generate_tokens([ids], greedy)[0].token_ids
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 40)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        assert got[: len(want)] == want and len(want) > 0, prompt
        # the logits of the last step agree too, not only their argmax (int8 quantises activations
        # per call, so one prefill of the whole text and step-by-step decoding differ slightly)
        last = generator.get_output("logits")[0, -1]
        mask = np.ones((1, len(ids) + len(got) - 1), np.int64)
        logits, _ = ours.forward(np.array([ids + got[:-1]]), mask, np.arange(mask.shape[1])[None], None)
        assert np.abs(last - logits[0, -1]).max() < (1e-4 if variant == "fp32" else 2e-2)
    config = read_json(folder / "genai_config.json")
    assert config["model"]["decoder"]["filename"] == ("model.onnx" if variant == "fp32" else "model.int8.onnx")
    assert config["search"]["do_sample"] is True and config["search"]["top_k"] == Sampling().top_k
    assert read_json(export_dir / "export.json")["genai"][variant]["greedy_tokens_equal"] > 0


def test_genai_text_equals_openllm_generate(export_dir: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    prompt = "ROMEO:\n"
    done = run_openllm("generate", "--model", str(export_dir), prompt, "--temperature", "0",
                       "--max-new-tokens", "24", cwd=export_dir)
    assert done.returncode == 0, done.stderr
    model = og.Model(str(export_dir))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tokenizer.encode(prompt)
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    assert done.stdout == tokenizer.decode(generator.get_sequence(0)) + "\n"


# ---------------------------------------------------------------- the stage command


def test_cli_export_stage(tmp_path: Path, params_file) -> None:
    params_file({"export": {"quantize": False, "huggingface": False, "register_model": False}})
    build_checkpoint(tmp_path / "models" / "checkpoints", step=10)
    done = run_openllm("export", "--step", "10", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step-10: ") and "models/export/step-10" in lines[0]
    assert (tmp_path / "models" / "export" / "step-10" / "model.onnx").is_file()

    missing = run_openllm("export", "--step", "99", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cli_export_of_a_checkpoint_without_its_tokenizer_is_one_line(tmp_path: Path, params_file) -> None:
    params_file({"export": {"quantize": False, "huggingface": False, "register_model": False}})
    checkpoint = build_checkpoint(tmp_path / "models" / "checkpoints", step=10)
    (checkpoint / "tokenizer.model").unlink()
    # with a tokenized corpus present, export compares its tokenizer with the checkpoint's first
    write_json(tmp_path / "data" / "tokenized" / "meta.json", {"tokenizer_sha256": "0" * 64})
    done = run_openllm("export", "--step", "10", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: models/checkpoints/step-10: tokenizer.model is missing"]
    assert not (tmp_path / "models" / "export").exists() or not any((tmp_path / "models" / "export").iterdir())
