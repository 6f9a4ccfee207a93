"""Tests for openllm.export: the ONNX folder, its checks, int8, Hugging Face and the MLflow registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fixtures_export import CONTEXT, build_checkpoint, build_export
from helpers import TINY_DOCS, run_openllm
from openllm.checkpoint import CheckpointError, load_model
from openllm.config import ExportConfig, MlflowConfig, SamplingConfig
from openllm.errors import OpenLLMError
from openllm.export import ALIAS_BEST, ALIAS_NEWEST, ExportError, export_checkpoint
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
    assert names == {"model.onnx", "model.int8.onnx", "tokenizer.model", "config.json", "export.json", "hf"}
    config = read_json(export_dir / "config.json")
    assert config["n_layer"] == 2 and config["n_head"] == 4 and config["head_dim"] == 8
    assert config["context_length"] == CONTEXT and config["vocab_size"] == 400
    assert (config["bos_id"], config["eos_id"], config["unk_id"]) == (1, 2, 0)
    assert config["sampling"] == SamplingConfig().model_dump()
    assert config["step"] == 10 and config["val_loss"] == 5.0 and config["opset"] == 18
    assert config["files"] == {"model": "model.onnx", "model_int8": "model.int8.onnx", "tokenizer": "tokenizer.model"}
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
        export_checkpoint(tmp_path / "missing", out, ExportConfig(), SamplingConfig(), None)
    bad = tmp_path / "step-10"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OpenLLMError, match="corrupt"):
        export_checkpoint(bad, out, ExportConfig(), SamplingConfig(), None)
    assert not out.exists() and not list((tmp_path / "export").glob(".*"))  # no temp folders left


def test_export_error_is_an_openllm_error() -> None:
    assert issubclass(ExportError, OpenLLMError)


# ---------------------------------------------------------------- int8


def test_int8_model_runs_and_is_measured(export_dir: Path, generator: OnnxGenerator) -> None:
    int8 = OnnxGenerator.load(export_dir, quantized=True)
    assert (export_dir / "model.int8.onnx").stat().st_size < (export_dir / "model.onnx").stat().st_size
    text = TINY_DOCS["a_hello.txt"]
    assert abs(int8.score(text)["loss"] - generator.score(text)["loss"]) < 0.05
    result = int8.generate("Hello", Sampling(temperature=0.0, max_new_tokens=8))
    assert 0 < result.completion_tokens <= 8
    figures = read_json(export_dir / "export.json")["int8"]
    for key in ("bits_per_byte_fp32", "bits_per_byte_int8", "bits_per_byte_change", "decode_speedup",
                "decode_tokens_per_second_fp32", "decode_tokens_per_second_int8"):
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


# ---------------------------------------------------------------- MLflow registry


def test_register_two_checkpoints_with_aliases(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from openllm import tracking

    checkpoints = tmp_path / "models" / "checkpoints"
    mlflow_cfg = MlflowConfig(experiment="export-test", registered_model="tiny-test")
    mlflow = tracking.setup(mlflow_cfg.experiment)
    with mlflow.start_run() as run:  # the "training run" that export logs into
        training_run = run.info.run_id
    checkpoints.mkdir(parents=True)
    (checkpoints / tracking.RUN_ID_FILE).write_text(training_run)

    # Step 20 is newer but worse: `newest` and `best` must differ.
    cfg = ExportConfig(quantize=False, huggingface=False, register_model=True)
    for step, val_loss, bpb in ((10, 4.0, 2.5), (20, 4.5, 2.75)):
        folder = build_checkpoint(checkpoints, step=step, val_loss=val_loss, seed=step)
        metrics = tmp_path / "metrics" / f"step-{step}.json"
        write_json(metrics, {"val_loss": val_loss, "val_bits_per_byte": bpb})
        report = export_checkpoint(folder, tmp_path / "export" / f"step-{step}", cfg, SamplingConfig(), mlflow_cfg,
                                   metrics_path=metrics)
        assert report["mlflow"]["run_id"] == training_run
        assert read_json(tmp_path / "export" / f"step-{step}" / "export.json")["mlflow"] == report["mlflow"]

    client = mlflow.MlflowClient()
    versions = {int(v.version): v for v in client.search_model_versions("name='tiny-test'")}
    assert len(versions) == 2
    by_step = {int(v.tags["step"]): number for number, v in versions.items()}
    assert set(by_step) == {10, 20}
    tags = versions[by_step[10]].tags
    assert float(tags["val_loss"]) == 4.0 and float(tags["val_bits_per_byte"]) == 2.5
    assert all(v.run_id == training_run for v in versions.values())
    assert int(client.get_model_version_by_alias("tiny-test", ALIAS_NEWEST).version) == by_step[20]
    assert int(client.get_model_version_by_alias("tiny-test", ALIAS_BEST).version) == by_step[10]

    # Re-exporting a checkpoint replaces its version: still one version per checkpoint.
    again = export_checkpoint(checkpoints / "step-10", tmp_path / "export" / "step-10", cfg, SamplingConfig(),
                              mlflow_cfg, metrics_path=tmp_path / "metrics" / "step-10.json")
    numbers = {int(v.version) for v in client.search_model_versions("name='tiny-test'")}
    assert numbers == {by_step[20], again["mlflow"]["version"]} and again["mlflow"]["version"] > by_step[20]
    by_step[10] = again["mlflow"]["version"]
    assert int(client.get_model_version_by_alias("tiny-test", ALIAS_BEST).version) == by_step[10]

    generator = OnnxGenerator.load(f"models:/tiny-test@{ALIAS_BEST}")
    assert generator.config["step"] == 10
    assert generator.generate("Hello", Sampling(temperature=0.0, max_new_tokens=5)).completion_tokens > 0
    assert OnnxGenerator.load(f"models:/tiny-test/{by_step[20]}").config["step"] == 20
    with pytest.raises(ModelLoadError, match="registry"):
        OnnxGenerator.load("models:/tiny-test@nonexistent")


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
