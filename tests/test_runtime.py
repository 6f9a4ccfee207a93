"""Tests for openllm.runtime (onnxruntime generation, streaming, scoring) and `openllm generate`."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_export import CONTEXT, build_checkpoint, build_export
from helpers import run_openllm
from openllm.checkpoint import load_model
from openllm.evaluate import token_nats
from openllm.decode import TextAssembler, blocked_pattern
from openllm.runtime import GenerationError, GenerationResult, ModelLoadError, OnnxGenerator
from openllm.sampling import Sampling
from openllm.tokenizer import EOS_ID
from openllm.torch_generate import generate_ids

GREEDY = Sampling(temperature=0.0, max_new_tokens=24)
HOT = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24, seed=7)


@pytest.fixture(scope="session")
def checkpoint(session_dir: Path) -> Path:
    return build_checkpoint(session_dir / "runtime-tests" / "checkpoints")


@pytest.fixture(scope="session")
def export_dir(session_dir: Path, checkpoint: Path) -> Path:
    return build_export(session_dir / "runtime-tests", quantize=False, huggingface=False)


@pytest.fixture(scope="session")
def generator(export_dir: Path) -> OnnxGenerator:
    return OnnxGenerator.load(export_dir)


@pytest.fixture(scope="session")
def model(checkpoint: Path):
    return load_model(checkpoint)


def test_import_does_not_load_torch() -> None:
    code = "import openllm.runtime, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- sampling


def test_same_seed_same_text_other_seed_other_text(generator: OnnxGenerator) -> None:
    a = generator.generate("ROMEO:\n", HOT)
    b = generator.generate("ROMEO:\n", HOT)
    c = generator.generate("ROMEO:\n", HOT.replace(seed=8))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_greedy_equals_torch_greedy(generator: OnnxGenerator, model) -> None:
    prompt = generator.encode("To be, or not to be")
    want = generate_ids(model, prompt, Sampling(temperature=0.0, max_new_tokens=40), eos_id=EOS_ID)
    assert generator.generate_tokens([prompt], Sampling(temperature=0.0, max_new_tokens=40))[0].token_ids == want


def test_batch_equals_one_at_a_time(generator: OnnxGenerator) -> None:
    prompts = ["Hi", "KING HENRY V:\nOnce more unto the breach", "東京 🙂"]
    batch = generator.generate_batch(prompts, GREEDY)
    for prompt, result in zip(prompts, batch):
        alone = generator.generate(prompt, GREEDY)
        assert result.token_ids == alone.token_ids and result.text == alone.text
        assert result.prompt_tokens == len(generator.encode(prompt))
    # Sampled: prompt i of a batch draws with seed + i, whatever else is in the batch.
    sampled = generator.generate_batch(prompts[:2], HOT)
    assert sampled[0].token_ids == generator.generate(prompts[0], HOT).token_ids
    assert sampled[1].token_ids == generator.generate(prompts[1], HOT.replace(seed=8)).token_ids


def test_rows_joining_a_running_batch_write_what_they_write_alone(generator: OnnxGenerator) -> None:
    """The server's continuous batching: rows join and leave between steps, texts unchanged."""
    prompts = [generator.encode(p) for p in ("ROMEO:\n", "To be, or not to be", "Hi", "東京 🙂")]
    settings = [HOT.replace(seed=s, max_new_tokens=m) for s, m in ((1, 20), (2, 5), (3, 12), (4, 16))]
    rows = [generator.new_row(p, s) for p, s in zip(prompts, settings)]
    batch = generator.decode_batch()
    batch.add(rows[:1])
    for join_at, row in ((3, rows[1]), (4, rows[2]), (9, rows[3])):
        while len(rows[0].tokens) < join_at:
            batch.step()
        batch.add([row])
    while batch.rows:
        batch.step()
    for prompt, sampling, row in zip(prompts, settings, rows):
        alone = generator.generate_tokens([prompt], sampling)[0]
        assert (row.tokens, row.text.text, row.finish) == (alone.token_ids, alone.text, alone.finish_reason)


def test_result_fields_and_timing(generator: OnnxGenerator) -> None:
    result = generator.generate("Hello", Sampling(temperature=0.0, max_new_tokens=5))
    assert isinstance(result, GenerationResult)
    assert result.finish_reason in ("stop", "length") and result.completion_tokens == len(result.token_ids) <= 5
    assert 0 < result.time_to_first_token <= result.seconds and result.tokens_per_second > 0


# ---------------------------------------------------------------- stop strings and streaming


def test_stop_strings(generator: OnnxGenerator) -> None:
    full = generator.generate("ROMEO:\n", HOT)
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[4:6]  # some text the model is known to write
    cut = generator.generate("ROMEO:\n", HOT, stop=[stop, "never written \x00"])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(generator.stream("ROMEO:\n", HOT, stop=[stop]))
    assert streamed == cut.text


def naive_cut(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def test_stop_matching_agrees_with_find_on_overlapping_stops() -> None:
    """Streamed text is cut at the earliest stop, and never shows a possible stop's beginning."""
    alphabet = ["a", "b", "ab", "ba", "aab", "c"]  # token texts; overlaps are the hard cases
    token_bytes = [t.encode() for t in alphabet]
    chooser = random.Random(0)
    for _ in range(300):
        stops = ["".join(chooser.choice("ab") for _ in range(chooser.randint(1, 5))) for _ in range(2)]
        tokens = [chooser.randrange(len(alphabet)) for _ in range(30)]
        assembler, shown, used = TextAssembler(token_bytes, stops), "", 0
        for token in tokens:
            shown, used = shown + assembler.add(token), used + 1
            if assembler.stopped:
                break
        text = "".join(alphabet[t] for t in tokens[:used])
        cut = naive_cut(text, stops)
        if cut is None:
            held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert not assembler.stopped and shown == text[: len(text) - held]
        else:
            assert assembler.stopped == "stop" and shown == text[:cut], (stops, text)


def test_the_output_filter_never_shows_the_start_of_a_match() -> None:
    """A blocked word split over tokens: its first piece is held back, then the text ends before it."""
    token_bytes = [t.encode() for t in ["Go ", "da", "mn", " it", "y", "!"]]
    blocked = blocked_pattern([r"\bdamn\b", "secret-\\d+"])

    def pieces(tokens: list[int]) -> tuple[list[str], str | None]:
        assembler = TextAssembler(token_bytes, (), blocked)
        shown = [assembler.add(t) for t in tokens]
        return shown + [assembler.finish()], assembler.stopped

    assert pieces([0, 1, 2, 3]) == (["Go ", "", "", "", ""], "content_filter")  # "da" is never shown
    assert pieces([0, 1, 4, 5]) == (["Go ", "", "day", "!", ""], None)  # released once it cannot match
    assert pieces([0, 1]) == (["Go ", "", "da"], None)  # the end of the text: "da" is no match
    assert pieces([0, 2, 3]) == (["Go ", "mn", " it", ""], None)
    assert blocked_pattern([]) is None


def test_export_without_a_checksum_is_refused(export_dir: Path, tmp_path: Path) -> None:
    """An export whose config.json lacks a file's sha256 is not loaded unchecked (a flipped byte was served)."""
    broken = tmp_path / "step-10"
    shutil.copytree(export_dir, broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.onnx").write_bytes(bytes(data))
    config = json.loads((broken / "config.json").read_text())
    del config["sha256"]["model.onnx"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no sha256 for model.onnx"):
        OnnxGenerator.load(broken)


def test_long_stop_strings_cost_time_linear_in_their_length(generator: OnnxGenerator) -> None:
    """Four 16,000-character stop strings used to make 60 tokens 14x slower (quadratic matching)."""
    sampling = HOT.replace(max_new_tokens=60)
    stops = [c * 16_000 for c in "abcd"]  # never matched, always partly held back
    def best_of_3(stop: list[str]) -> tuple[float, list[int]]:  # the fastest run: other work on the machine
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            result = generator.generate("ROMEO:\n", sampling, stop=stop)
            runs.append(time.perf_counter() - started)
        return min(runs), result.token_ids

    no_stops, plain = best_of_3([])
    with_stops, tokens = best_of_3(stops)
    assert tokens == plain
    assert with_stops < 3 * no_stops + 0.2  # building the tables: 64,000 steps


def test_stream_joins_to_generate_with_emoji_and_cjk(generator: OnnxGenerator) -> None:
    for prompt in ("Emoji 🙂🚀 and 東京", "漢字とひらがな"):
        results: list[GenerationResult] = []
        pieces = list(generator.stream(prompt, HOT, results=results))
        assert all(piece and piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)
        assert "".join(pieces) == results[0].text == generator.generate(prompt, HOT).text


class ScriptedSession:
    """Stands in for onnxruntime: its logits always pick the next token of a fixed script."""

    def __init__(self, script: list[int], vocab: int, n_layer: int) -> None:
        self.script, self.vocab, self.n_layer, self.calls = script, vocab, n_layer, 0

    def run(self, _outputs, feed: dict[str, np.ndarray]):
        B, T = feed["input_ids"].shape
        logits = np.zeros((B, T, self.vocab), np.float32)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        grow = lambda past: np.concatenate([past, np.zeros((B, *past.shape[1:2], T, past.shape[3]), np.float32)], 2)
        return [logits, *(grow(feed[name]) for name in list(feed)[3:])]


def test_stream_never_splits_a_character(generator: OnnxGenerator) -> None:
    text = "a🌍語b"  # neither character is in the vocabulary: 4 + 3 byte-fallback tokens
    script = generator.encode(text)
    assert sum(generator.tokenizer.is_byte(i) for i in script) == 7
    scripted = OnnxGenerator(ScriptedSession(script, generator.vocab_size, generator.n_layer),
                             generator.tokenizer, generator.config, "scripted")
    results: list[GenerationResult] = []
    pieces = list(scripted.stream("x", Sampling(temperature=0.0, max_new_tokens=len(script)), results=results))
    assert "".join(pieces) == text == results[0].text
    assert pieces == ["a", "🌍", "語", "b"]  # whole characters, each as soon as its last byte arrives
    assert results[0].finish_reason == "length"
    # Cut short inside a character: the incomplete bytes become one U+FFFD, never broken UTF-8.
    short = OnnxGenerator(ScriptedSession(script, generator.vocab_size, generator.n_layer),
                          generator.tokenizer, generator.config, "scripted")
    assert short.generate("x", Sampling(temperature=0.0, max_new_tokens=3)).text == "a\ufffd"


# ---------------------------------------------------------------- limits and validation


def test_long_prompt_keeps_its_end_and_stops_at_the_context(generator: OnnxGenerator) -> None:
    prompt = "word " * 200
    ids = generator.encode(prompt)
    assert len(ids) > CONTEXT
    result = generator.generate(prompt, Sampling(temperature=0.0, max_new_tokens=20))
    assert result.prompt_tokens == CONTEXT - 1 and result.truncated_prompt_tokens == len(ids) - (CONTEXT - 1)
    assert result.completion_tokens <= 1 and (result.finish_reason == "length" or result.completion_tokens == 0)
    near = generator.generate_tokens([ids[-(CONTEXT - 10):]], Sampling(temperature=0.0, max_new_tokens=50))[0]
    assert near.completion_tokens <= 10 and near.prompt_tokens + near.completion_tokens <= CONTEXT


def test_invalid_inputs_are_clear_errors(generator: OnnxGenerator) -> None:
    with pytest.raises(GenerationError, match="empty"):
        generator.generate("", GREEDY)
    with pytest.raises(GenerationError, match="empty"):
        list(generator.stream("", GREEDY))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generator.generate("Hi", Sampling(max_new_tokens=CONTEXT))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generator.sampling(max_new_tokens=0)
    with pytest.raises(GenerationError, match="temperature"):
        generator.sampling(temperature=-1.0)
    with pytest.raises(GenerationError, match="token ids"):
        generator.generate_tokens([[1, generator.vocab_size]], GREEDY)
    with pytest.raises(GenerationError, match="empty"):
        generator.generate_tokens([[]], GREEDY)
    with pytest.raises(GenerationError, match="stop"):
        generator.generate("Hi", GREEDY, stop=[""])
    with pytest.raises(GenerationError, match="too short"):
        generator.score("a")


# ---------------------------------------------------------------- scoring


def test_score_matches_torch(generator: OnnxGenerator, model) -> None:
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 8  # more than one window
    ids = generator.encode(text)
    assert len(ids) > CONTEXT + 1
    total, count = token_nats(model, np.asarray(ids))
    got = generator.score(text)
    assert got["tokens"] == count == len(ids) - 1 and got["bytes"] == len(text.encode())
    assert abs(got["loss"] - total / count) <= 1e-4
    assert abs(got["bits_per_byte"] - total / (np.log(2) * len(text.encode()))) <= 1e-4
    assert abs(got["perplexity"] - np.exp(got["loss"])) <= 1e-6 * got["perplexity"]


def test_cli_score_gives_the_same_figures_for_checkpoint_and_export(
    checkpoint: Path, export_dir: Path, tmp_path: Path
) -> None:
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? \u00e9t\u00e9 \u2014 \u795e\U0001F339\n" * 6
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    scored = {}
    for model in (checkpoint, export_dir):
        done = run_openllm("score", "--model", str(model), str(path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        scored[model] = json.loads(done.stdout)
    torch_side, onnx_side = scored[checkpoint], scored[export_dir]
    assert (torch_side["backend"], onnx_side["backend"]) == ("pytorch", "onnxruntime")
    assert torch_side["bytes"] == onnx_side["bytes"] == len(text.encode("utf-8")) > len(text)
    assert torch_side["tokens"] == onnx_side["tokens"] > CONTEXT  # several windows
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert abs(torch_side[key] - onnx_side[key]) <= 1e-4 * max(1.0, torch_side[key]), key
    # the figures follow from the totals: perplexity = exp(loss), bits/byte on UTF-8 bytes
    total = torch_side["loss"] * torch_side["tokens"]
    assert torch_side["bits_per_byte"] == pytest.approx(total / (np.log(2) * torch_side["bytes"]))
    assert torch_side["perplexity"] == pytest.approx(np.exp(torch_side["loss"]))


@pytest.mark.parametrize("case, message", [
    ("missing file", "cannot read"),
    ("not utf-8", "not UTF-8 text"),
    ("too short", "too short"),
    ("not a model", "neither a checkpoint"),
    ("corrupt checkpoint", "step-10"),
])
def test_cli_score_errors_are_one_line(checkpoint: Path, export_dir: Path, tmp_path: Path, case, message) -> None:
    path, model = tmp_path / "text.txt", export_dir
    path.write_text("Some text to score, long enough.\n", encoding="utf-8")
    if case == "missing file":
        path = tmp_path / "nope.txt"
    elif case == "not utf-8":
        path.write_bytes(b"caf\xe9 au lait\n")
    elif case == "too short":
        path.write_text("a", encoding="utf-8")
    elif case == "not a model":
        model = tmp_path
    else:
        model = tmp_path / "bad" / "step-10"
        shutil.copytree(checkpoint, model)
        with open(model / "model.safetensors", "r+b") as f:
            f.seek(200)
            f.write(b"\x00" * 64)
    done = run_openllm("score", "--model", str(model), str(path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout)
    assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------- the CLI


def test_cli_generate_streams_and_reports_errors(export_dir: Path, tmp_path: Path) -> None:
    ok = run_openllm("generate", "--model", str(export_dir), "--temperature", "0", "--max-new-tokens", "8",
                     "ROMEO:", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ROMEO:") and "tokens/s" in ok.stderr

    for args, message in (
        (["--model", str(export_dir), ""], "prompt is empty"),
        (["--model", str(export_dir), "--max-new-tokens", "100000", "Hi"], "max_new_tokens"),
        (["--model", str(tmp_path / "missing"), "Hi"], "not found"),
        (["--model", str(export_dir), os.fsdecode(b"caf\xe9 au lait")], "not valid UTF-8"),  # Latin-1 bytes
        (["--model", str(export_dir), "--stop", os.fsdecode(b"\xff"), "Hi"], "not valid UTF-8"),
    ):
        bad = run_openllm("generate", *args, cwd=tmp_path)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], bad.stderr
        assert bad.stdout == ""
