"""The genai engine: onnxruntime-genai generating behind `openllm generate`, the decode loop and the server.

Every test runs a real onnxruntime-genai session on a real export (fp32 and int8) and compares
it with the default onnxruntime engine on the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures_export import build_export
from helpers import run_openllm
from openllm.decode import blocked_pattern
from openllm.genai_engine import GENAI_CONFIG, GenaiBatch
from openllm.runtime import GenerationError, ModelLoadError, OnnxGenerator
from openllm.sampling import Sampling

pytest.importorskip("onnxruntime_genai")

PROMPTS = ["ROMEO:\n", "Good morrow, my lord, and"]  # different lengths
GREEDY = Sampling(temperature=0.0, max_new_tokens=40)
HOT = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30, seed=11)


@pytest.fixture(scope="module")
def export_dir(session_dir: Path) -> Path:
    return build_export(session_dir / "genai-engine-tests", huggingface=False)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def pair(request, export_dir: Path) -> tuple[OnnxGenerator, OnnxGenerator]:
    """The same export loaded on each engine: (onnxruntime, genai)."""
    quantized = request.param == "int8"
    return (OnnxGenerator.load(export_dir, quantized=quantized),
            OnnxGenerator.load(export_dir, quantized=quantized, engine="genai"))


def test_greedy_tokens_equal_the_onnxruntime_engine(pair) -> None:
    ours, genai = pair
    assert (ours.engine, genai.engine) == ("onnxruntime", "genai")
    assert isinstance(genai.decode_batch(), GenaiBatch)
    want, got = ours.generate_batch(PROMPTS, GREEDY), genai.generate_batch(PROMPTS, GREEDY)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert all(r.completion_tokens > 0 for r in got)


def test_a_seed_repeats_the_sampled_text_and_another_seed_changes_it(pair) -> None:
    _, genai = pair
    first, again = genai.generate(PROMPTS[0], HOT), genai.generate(PROMPTS[0], HOT)
    other = genai.generate(PROMPTS[0], HOT.replace(seed=12))
    assert first.token_ids == again.token_ids and first.completion_tokens == 30
    assert other.token_ids != first.token_ids


def test_stop_strings_filter_length_and_streaming_work_as_on_the_default_engine(pair) -> None:
    ours, genai = pair
    full = ours.generate(PROMPTS[0], GREEDY).text
    assert len(full) > 6
    stop = full[3:6]
    for generator in (ours, genai):
        stopped = generator.generate(PROMPTS[0], GREEDY, stop=[stop])
        assert (stopped.text, stopped.finish_reason) == (full[:full.index(stop)], "stop")
        pieces = list(generator.stream(PROMPTS[0], GREEDY, blocked=blocked_pattern([stop])))
        assert "".join(pieces) == full[:full.index(stop)]
        short = generator.generate(PROMPTS[0], GREEDY.replace(max_new_tokens=3))
        assert (short.completion_tokens, short.finish_reason) == (3, "length")


def test_log_probabilities_are_refused_by_the_genai_engine(pair) -> None:
    _, genai = pair
    row = genai.new_row(genai.encode(PROMPTS[0]), GREEDY, top_logprobs=2)
    with pytest.raises(ValueError, match="log-probabilities are not available with the genai engine"):
        genai.decode_batch().add([row])


def test_loading_without_genai_files_or_with_an_unknown_engine_says_why(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"engine='vllm' must be one of \['onnxruntime', 'genai'\]"):
        OnnxGenerator.load(export_dir, engine="vllm")
    bare = tmp_path / "step-10"
    shutil.copytree(export_dir, bare)
    (bare / GENAI_CONFIG).unlink()
    with pytest.raises(ModelLoadError, match="no genai_config.json, so the genai engine cannot run it"):
        OnnxGenerator.load(bare, engine="genai")
    OnnxGenerator.load(bare)  # the default engine does not need it
    (bare / GENAI_CONFIG).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="onnxruntime-genai cannot load it"):
        OnnxGenerator.load(bare, engine="genai")


def test_bad_sampling_is_refused_before_generating(pair) -> None:
    _, genai = pair
    with pytest.raises(GenerationError, match="max_new_tokens"):
        genai.generate(PROMPTS[0], GREEDY.replace(max_new_tokens=genai.context_length))
    with pytest.raises(GenerationError, match="the prompt is empty"):
        genai.generate("", GREEDY)


def test_openllm_generate_with_the_genai_engine_prints_the_same_greedy_text(export_dir: Path, tmp_path: Path) -> None:
    args = ("generate", "--model", str(export_dir), "--temperature", "0", "--max-new-tokens", "16", PROMPTS[0])
    default = run_openllm(*args, cwd=tmp_path)
    genai = run_openllm(*args[:-1], "--engine", "genai", PROMPTS[0], cwd=tmp_path)
    assert default.returncode == 0 and genai.returncode == 0, default.stderr + genai.stderr
    assert genai.stdout == default.stdout and genai.stdout.startswith(PROMPTS[0])
    bad = run_openllm(*args[:-1], "--engine", "vllm", PROMPTS[0], cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'vllm'" in bad.stderr
