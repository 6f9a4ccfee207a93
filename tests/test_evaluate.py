"""The evaluate stage: figures against a direct computation, bytes not characters, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_DOCS, run_openllm, write_params
from openllm import checkpoint as ckpt
from openllm.config import EvaluateConfig, TokenizerConfig
from openllm.data import shakespeare_documents, write_corpus
from openllm.evaluate import EvaluationError, evaluate_checkpoint, language_metrics, log_to_mlflow, token_nats
from openllm.fileio import write_json
from openllm.model import GPT, GPTConfig
from openllm.paths import step_folder
from openllm.scoring import sliding_windows
from openllm.tokenizer import tokenize


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tokenized tiny corpus and one checkpoint (step-5) trained on it for a few steps."""
    root = tmp_path_factory.mktemp("evaluate")
    play = shakespeare_documents()[0][0][1][:20000]
    train = [("play", play)] + [(n, t * 3) for n, t in TINY_DOCS.items() if n != "d_cjk.txt"]
    validation = [("cjk", TINY_DOCS["d_cjk.txt"] * 6)]  # non-ASCII: bytes != characters
    write_corpus(root / "data/raw", iter(train), iter(validation), 0.1, {"name": "test"})
    meta = tokenize(root / "data/raw", root / "data/tokenized", TokenizerConfig(vocab_size=400, workers=1))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], context_length=16, n_layer=1, n_head=2, n_embd=16,
                          intermediate_size=32))
    ckpt.save_checkpoint(step_folder(root / "models/checkpoints", 5), model,
                         root / "data/tokenized/tokenizer.model",
                         {"step": 5, "tokens_seen": 640, "tokenizer_sha256": meta["tokenizer_sha256"]})
    return root


def direct_nats(model: GPT, tokens: np.ndarray) -> float:
    """Sum of -log p(token) computed one window at a time with an explicit log-softmax."""
    context, total = model.config.context_length, 0.0
    for start in range(0, len(tokens) - 1, context):
        window = torch.tensor(tokens[start : start + context + 1].astype(np.int64))[None]
        with torch.no_grad():
            logits, _ = model(window[:, :-1])
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        total -= log_probs[0].gather(1, window[0, 1:, None]).sum().item()
    return total


def test_figures_match_a_direct_computation(workspace: Path) -> None:
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    tokens = np.memmap(workspace / "data/tokenized/val.bin", dtype=np.uint16, mode="r")
    assert len(tokens) > 3 * model.config.context_length  # several windows and a short last one
    total, count = token_nats(model, tokens, batch_size=3)
    assert count == len(tokens) - 1  # every token but the first is predicted once
    assert total == pytest.approx(direct_nats(model, tokens), rel=1e-9)


@pytest.mark.parametrize("stride", [1, 3])
def test_sliding_windows_predict_each_token_once_with_more_context(workspace: Path, stride: int) -> None:
    """Stride 1: every token is predicted from exactly the context's worth of tokens before it (fewer
    at the start), computed here one token at a time. Stride 3: every token once, at least
    context - 3 tokens before it. Stride = context: the non-overlapping figure."""
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    context = model.config.context_length
    tokens = np.asarray(np.memmap(workspace / "data/tokenized/val.bin", dtype=np.uint16, mode="r")[: 2 * context + 5])
    total, count = token_nats(model, tokens, batch_size=4, stride=stride)
    assert count == len(tokens) - 1
    if stride == 1:
        expected = 0.0
        for t in range(1, len(tokens)):
            window = torch.tensor(tokens[max(0, t - context) : t].astype(np.int64))[None]
            with torch.no_grad():
                logits, _ = model(window)
            expected -= torch.log_softmax(logits[0, -1].double(), dim=-1)[int(tokens[t])].item()
        assert total == pytest.approx(expected, rel=1e-6)
    for length, skip, starts in sliding_windows(len(tokens), context, stride, 4):
        assert length <= context
        assert all(skip >= context - stride for s in starts if s > 0)  # scored tokens have that much context
    assert token_nats(model, tokens, stride=context) == token_nats(model, tokens)


def test_short_text_is_one_window(workspace: Path) -> None:
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    tokens = np.array([5, 9, 30, 7, 3], dtype=np.uint16)
    total, count = token_nats(model, tokens)
    with torch.no_grad():
        logits, _ = model(torch.tensor(tokens[None, :-1].astype(np.int64)))
    expected = torch.nn.functional.cross_entropy(logits[0].double(), torch.tensor(tokens[1:].astype(np.int64)),
                                                 reduction="sum").item()
    assert (total, count) == (pytest.approx(expected, rel=1e-9), 4)
    with pytest.raises(EvaluationError):
        token_nats(model, tokens[:1])


def test_bits_per_byte_counts_utf8_bytes_not_characters() -> None:
    text = "Café 🙂 東京"
    assert len(text.encode()) == 17 and len(text) == 9
    figures = language_metrics(total_nats=10.0, tokens=5, text_bytes=len(text.encode()))
    assert figures["loss"] == 2.0
    assert figures["perplexity"] == pytest.approx(math.exp(2.0))
    assert figures["bits_per_byte"] == pytest.approx(10.0 / (math.log(2) * 17))


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-9), ("bf16", 1e-2)])
def test_evaluation_precision(workspace: Path, tmp_path: Path, precision: str, tolerance: float) -> None:
    """fp32 gives the exact figures; bf16 autocast (the default on CPUs with AVX-512) is close."""
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    tokens = np.memmap(workspace / "data/tokenized/val.bin", dtype=np.uint16, mode="r")
    exact = direct_nats(model, tokens) / (len(tokens) - 1)
    cfg = EvaluateConfig(precision=precision, prompts=["Hi"], sampling={"max_new_tokens": 2})
    metrics, _ = evaluate_checkpoint(workspace / "models/checkpoints/step-5", workspace / "data/tokenized", cfg,
                                     tmp_path / "m.json", tmp_path / "s.md")
    assert metrics["eval_precision"] == precision
    assert metrics["val_loss"] == pytest.approx(exact, rel=tolerance)
    if precision == "bf16":
        assert metrics["val_loss"] != exact  # it did run in bf16


def test_evaluate_checkpoint_writes_metrics_and_samples(workspace: Path) -> None:
    cfg = EvaluateConfig(prompts=["Hello", "Café "], sampling={"max_new_tokens": 6, "seed": 3})
    out = workspace / "metrics"
    metrics, timings = evaluate_checkpoint(workspace / "models/checkpoints/step-5", workspace / "data/tokenized",
                                           cfg, out / "evaluate/step-5.json", out / "samples/step-5.md")
    saved = json.loads((out / "evaluate/step-5.json").read_text())
    assert saved == metrics and timings["eval_tokens_per_second"] > 0  # timings: MLflow only
    val_text = json.loads((workspace / "data/raw/val.jsonl").read_text().splitlines()[0])["text"]
    assert saved["val_bytes"] == len(val_text.encode("utf-8")) != len(val_text)  # non-ASCII corpus
    assert saved["val_perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
    assert saved["val_bits_per_byte"] == pytest.approx(
        saved["val_loss"] * saved["val_tokens"] / (math.log(2) * saved["val_bytes"]))
    assert saved["step"] == 5 and saved["tokens_seen"] == 640 and "eval_tokens_per_second" not in saved
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    tokens = np.memmap(workspace / "data/tokenized/val.bin", dtype=np.uint16, mode="r")
    half = model.config.context_length // 2  # evaluate.sliding_stride 0.5
    assert saved["val_bits_per_byte_sliding"] == pytest.approx(  # the stage ran in bf16 autocast
        token_nats(model, tokens, stride=half)[0] / (math.log(2) * saved["val_bytes"]), rel=1e-3)
    assert saved["val_bits_per_byte_sliding"] != saved["val_bits_per_byte"]
    assert f"stride {half}:" in saved["val_sliding_protocol"]
    samples = (out / "samples/step-5.md").read_text()
    assert samples.count("**Greedy**") == 2 and samples.count("**Sampled**") == 2
    assert "Prompt: 'Café'" in samples
    # The same seed gives the same samples.
    evaluate_checkpoint(workspace / "models/checkpoints/step-5", workspace / "data/tokenized", cfg,
                        out / "evaluate/again.json", out / "samples/again.md")
    assert (out / "samples/again.md").read_text() == samples
    assert (out / "evaluate/again.json").read_bytes() == (out / "evaluate/step-5.json").read_bytes()


def test_max_tokens_scores_the_start_of_the_split(workspace: Path, tmp_path: Path) -> None:
    """evaluate.max_tokens: a quick look at the first N validation tokens, scored the same way."""
    model = ckpt.load_model(workspace / "models/checkpoints/step-5")
    tokens = np.memmap(workspace / "data/tokenized/val.bin", dtype=np.uint16, mode="r")
    cfg = EvaluateConfig(precision="fp32", max_tokens=40, prompts=["Hi"], sampling={"max_new_tokens": 2})
    metrics, _ = evaluate_checkpoint(workspace / "models/checkpoints/step-5", workspace / "data/tokenized", cfg,
                                     tmp_path / "m.json", tmp_path / "s.md")
    assert metrics["val_tokens"] == 39 and "first 40 tokens" in metrics["val_protocol"]
    assert metrics["val_loss"] == pytest.approx(direct_nats(model, np.asarray(tokens[:40])) / 39, rel=1e-9)
    assert 0 < metrics["val_bytes"] < json.loads((workspace / "data/tokenized/meta.json").read_text())["val"]["bytes"]


def test_missing_or_corrupt_checkpoint_is_a_clear_error(workspace: Path, tmp_path: Path) -> None:
    cfg = EvaluateConfig()
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        evaluate_checkpoint(tmp_path / "step-7", workspace / "data/tokenized", cfg, tmp_path / "m.json",
                            tmp_path / "s.md")
    corrupt = tmp_path / "step-5"
    import shutil

    shutil.copytree(workspace / "models/checkpoints/step-5", corrupt)
    weights = corrupt / ckpt.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        evaluate_checkpoint(corrupt, workspace / "data/tokenized", cfg, tmp_path / "m.json", tmp_path / "s.md")
    assert not (tmp_path / "m.json").exists()


def test_cli_reports_a_missing_checkpoint_in_one_line(workspace: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    (tmp_path / "data").symlink_to(workspace / "data")
    result = run_openllm("evaluate", "--step", "99", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: models/checkpoints/step-99: checkpoint not found"]
    assert not (tmp_path / "metrics").exists()


def test_metrics_go_into_the_training_run(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from openllm import tracking

    mlflow = tracking.setup("evaluate-test")
    with mlflow.start_run() as run:
        pass
    samples = tmp_path / "step-5.md"
    samples.write_text("# samples\n")
    metrics = {"step": 5, "val_loss": 3.0, "val_perplexity": math.exp(3), "val_bits_per_byte": 1.5,
               "eval_tokens_per_second": 100.0}
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.parent.mkdir()
    tracking.write_run_id(checkpoints, run.info.run_id)
    log_to_mlflow("evaluate-test", checkpoints, metrics, samples)
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "eval_val_bits_per_byte")
    assert [(m.step, m.value) for m in history] == [(5, 1.5)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_tokens_per_second")] == [100.0]
    assert not any(k.startswith("eval_eval_") for k in client.get_run(run.info.run_id).data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-5.md"]


def test_report_adds_plots_and_table_to_the_training_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from openllm import tracking
    from openllm.report import build_report, log_to_mlflow as report_to_mlflow

    metrics = tmp_path / "metrics"
    for step, bpb in ((10, 2.5), (20, 2.0), (30, 2.1)):
        write_json(metrics / "evaluate" / f"step-{step}.json",
                   {"step": step, "tokens_seen": step * 64, "val_loss": bpb * 1.5, "parameters": 1000,
                    "val_perplexity": math.exp(bpb * 1.5), "val_bits_per_byte": bpb})
    report = build_report(metrics, [10, 20, 30])
    assert [p.name for p in report["plots"]] == ["bits_per_byte.png"]  # no training TSVs here
    summary = json.loads((metrics / "summary.json").read_text())
    assert list(summary["final"])[0] == "val_bits_per_byte"  # the headline comes first
    assert summary["final"]["step"] == 30 and summary["best"]["step"] == 20
    assert summary["best"]["val_bits_per_byte"] == 2.0 and summary["parameters"] == 1000
    mlflow = tracking.setup("report-test")
    with mlflow.start_run() as run:
        pass
    assert report_to_mlflow("report-test", run.info.run_id, metrics, report["plots"])
    client = mlflow.tracking.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/bits_per_byte.png"]
    assert "results.md" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert not report_to_mlflow("report-test", "0" * 32, metrics, report["plots"])  # unknown run: skipped
    assert not report_to_mlflow("report-test", None, metrics, report["plots"])


def test_report_removes_outputs_of_unlisted_checkpoints(tmp_path: Path) -> None:
    from openllm.report import remove_unlisted

    metrics, exports = tmp_path / "metrics", tmp_path / "models" / "export"
    for step in (10, 20):
        write_json(metrics / "evaluate" / f"step-{step}.json", {"step": step})
        (metrics / "samples").mkdir(parents=True, exist_ok=True)
        (metrics / "samples" / f"step-{step}.md").write_text("samples")
        (exports / f"step-{step}").mkdir(parents=True)
        (exports / f"step-{step}" / "model.onnx").write_bytes(b"onnx")
    (exports / "notes").mkdir()  # not a step folder: never touched
    removed = remove_unlisted(metrics, exports, [20])
    assert [p.relative_to(tmp_path).as_posix() for p in removed] == [
        "metrics/evaluate/step-10.json", "metrics/samples/step-10.md", "models/export/step-10"]
    assert sorted(p.name for p in exports.iterdir()) == ["notes", "step-20"]
    assert (metrics / "evaluate" / "step-20.json").is_file()


def test_results_table_shows_the_sliding_figure_and_both_protocols() -> None:
    from openllm.report import results_markdown

    row = {"step": 10, "tokens_seen": 640, "val_loss": 1.0, "val_perplexity": math.e, "val_bits_per_byte": 1.5,
           "val_protocol": "consecutive windows of 8 tokens, stride 8"}
    plain = results_markdown([row], {})
    assert "sliding" not in plain and "over consecutive windows of 8 tokens, stride 8." in plain
    both = results_markdown([row | {"val_bits_per_byte_sliding": 1.25, "val_sliding_protocol": "windows of 8, stride 4"}],
                            {})
    assert "| 1.5000 | 1.2500 |" in both and "sliding: windows of 8, stride 4." in both
