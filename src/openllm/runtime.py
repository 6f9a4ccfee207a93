"""The one text generator for users: onnxruntime + SentencePiece + numpy, no PyTorch.

The CLI (``openllm generate``, ``openllm score``), the Streamlit app and the HTTP server all
load an :class:`OnnxGenerator` from an export folder (``models/export/step-N``, written by
:mod:`openllm.export`) or from the MLflow Model Registry (``models:/<name>@<alias>``), so a
served model behaves exactly like the one that was verified at export time.

Behaviour worth knowing:

- Generation runs the decode loop of :mod:`openllm.decode` (as the PyTorch paths and the server
  do) over :meth:`OnnxGenerator.forward`. Prompt ``i`` of a batch is sampled with its own generator seeded ``seed + i``, so a prompt's
  text does not depend on what else is in the batch (and prompt 0 matches a lone prompt).
- A prompt longer than the context keeps its last ``context_length - 1`` tokens (like
  :func:`openllm.torch_generate.generate_ids`); ``truncated_prompt_tokens`` says how many were
  dropped. Generation stops at the context limit with ``finish_reason == "length"``.
- Text is produced from token bytes with an incremental UTF-8 decoder: a character split over
  several byte-fallback tokens is only shown once complete, and streamed pieces never include
  (or run past) a stop string. Text equals SentencePiece's ``decode`` except for invalid byte
  sequences, which may become a different number of U+FFFD characters.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import regex
from pydantic import ValidationError

from .decode import DecodeBatch, Row, TextAssembler
from .errors import OpenLLMError
from .fileio import sha256_file
from .genai_engine import ENGINES, GENAI_CONFIG, INT8_DIR, GenaiBatch, load_genai_model
from .manifest import MANIFEST_FILE, ExportManifest, ManifestError, read_manifest
from .registry import PREFIX as REGISTRY_PREFIX
from .sampling import Sampling, one_line
from .scoring import language_metrics, score_windows
from .tokenizer import load_tokenizer

CONFIG_FILE = MANIFEST_FILE  # the export's manifest, written by the export stage


class ModelLoadError(OpenLLMError):
    """An export folder or registry model is missing, incomplete or corrupt."""


class GenerationError(OpenLLMError, ValueError):
    """A prompt, token ids or sampling settings that cannot be run."""


def input_names(n_layer: int) -> list[str]:
    """ONNX input names, in the Hugging Face Optimum / onnxruntime-genai convention."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value"))]


@dataclass
class GenerationResult:
    """One prompt's completion and how it went."""

    text: str  # the completion (without the prompt), cut before a stop string
    token_ids: list[int]  # generated ids (an end-of-text id is not included)
    prompt_tokens: int  # prompt tokens the model read
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) | "length" (max tokens or context) | "content_filter"
    seconds: float  # wall time of the whole call (shared by the prompts of a batch)
    time_to_first_token: float  # seconds until the first new token was chosen
    truncated_prompt_tokens: int = 0  # tokens dropped from the start of an over-long prompt

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def _token_bytes(tokenizer) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (what SentencePiece's decode joins)."""
    table = []
    for i in range(tokenizer.vocab_size()):
        piece = tokenizer.id_to_piece(i)
        if tokenizer.is_byte(i):  # byte-fallback piece "<0xE2>"
            table.append(bytes([int(piece[3:5], 16)]))
        elif tokenizer.is_control(i):  # <s>, </s>: no text
            table.append(b"")
        elif tokenizer.is_unknown(i):
            table.append(" \u2047 ".encode())  # SentencePiece's surface for <unk>
        else:
            table.append(piece.replace("\u2581", " ").encode())
    return table


class OnnxGenerator:
    """Generate and score text with an exported model; build it with :meth:`load`."""

    def __init__(self, session: ort.InferenceSession, tokenizer, config: dict[str, Any], source: str) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.source = source  # where it was loaded from, for messages
        self.n_layer, self.n_head, self.head_dim = config["n_layer"], config["n_head"], config["head_dim"]
        self.context_length: int = config["context_length"]
        self.vocab_size: int = config["vocab_size"]
        self.eos_id: int = config["eos_id"]
        self.default_sampling = Sampling(**config["sampling"])
        self.registry_version: str | None = None  # the MLflow model version, when loaded from the registry
        self._token_bytes = _token_bytes(tokenizer)
        self._inputs, self._outputs = input_names(self.n_layer), output_names(self.n_layer)
        self._genai: Any = None  # the onnxruntime-genai model when loaded with engine="genai"

    # --- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | Path, quantized: bool = False, threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True, engine: str = "onnxruntime",
    ) -> OnnxGenerator:
        """Load an export folder, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.

        ``quantized`` picks ``model.int8.onnx`` instead of the fp32 ``model.onnx``;
        ``threads`` sets onnxruntime's intra-op threads (0 = its default, one per core).
        ``spinning``: idle onnxruntime worker threads busy-wait for the next model call, which
        makes one generation faster (the wake-up of a sleeping thread costs more than a small
        model's layer). A server, whose HTTP threads need the same cores, turns it off.
        ``engine``: ``"onnxruntime"`` (default) generates with the decode loop of
        :mod:`openllm.decode`; ``"genai"`` with onnxruntime-genai on the export's genai folder
        (:mod:`openllm.genai_engine`). Scoring always uses onnxruntime.
        """
        if engine not in ENGINES:
            raise ModelLoadError(f"engine={engine!r} must be one of {list(ENGINES)}")
        if str(path).startswith(REGISTRY_PREFIX):
            return cls._load_registry(str(path), quantized, threads, providers, spinning, engine)
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: model folder not found (run `openllm export` first)")
        config = _read_config(folder)
        name = config["files"]["model_int8" if quantized else "model"]
        if name is None:
            raise ModelLoadError(f"{folder}: has no int8 model (export.quantize was off)")
        model_path, tokenizer_path = _find(folder, name), _find(folder, config["files"]["tokenizer"])
        for path in (model_path, tokenizer_path):  # catches any corruption, not just unparsable files
            expected = config["sha256"].get(path.name) if isinstance(config["sha256"], dict) else None
            if not expected:  # an unchecked file could be anything: refuse it, as a wrong checksum
                raise ModelLoadError(f"{folder / CONFIG_FILE}: no sha256 for {path.name}, so it cannot be verified")
            if sha256_file(path) != expected:
                raise ModelLoadError(f"{path}: corrupt (sha256 differs from {CONFIG_FILE})")
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.vocab_size() != config["vocab_size"]:
            raise ModelLoadError(
                f"{folder}: the tokenizer has {tokenizer.vocab_size()} pieces, the model {config['vocab_size']}"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # errors only
        try:
            session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelLoadError(f"{model_path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        got = [i.name for i in session.get_inputs()]
        if got != input_names(config["n_layer"]):
            raise ModelLoadError(f"{model_path}: unexpected inputs {got}")
        try:
            generator = cls(session, tokenizer, config, str(model_path))
        except (KeyError, TypeError, ValueError) as exc:  # e.g. invalid default sampling
            raise ModelLoadError(f"{folder}: invalid {CONFIG_FILE} ({exc})") from None
        if engine == "genai":
            generator._genai = _load_genai(folder / INT8_DIR if quantized else folder, threads)
        return generator

    @classmethod
    def _load_registry(
        cls, uri: str, quantized: bool, threads: int, providers: Sequence[str], spinning: bool, engine: str
    ) -> OnnxGenerator:
        """Download a registered model's files (MLflow), load them, drop the download."""
        from . import registry  # MLflow only here: the registry is optional for serving

        with tempfile.TemporaryDirectory(prefix="openllm-model-") as tmp:
            try:
                version = registry.resolve_version(uri)  # an alias's version, before the download
                folder = registry.download_export(registry.version_uri(registry.model_name(uri), version), Path(tmp))
            except registry.RegistryError as exc:
                raise ModelLoadError(str(exc)) from None
            generator = cls.load(folder, quantized, threads, providers, spinning, engine)  # all in memory afterwards
        generator.source = uri
        generator.registry_version = version
        return generator

    @property
    def manifest(self) -> ExportManifest:
        """The export's typed manifest: shape, files, sampling, checkpoint and evaluation figures."""
        return ExportManifest.from_dict(self.config, self.source)

    # --- one model call ----------------------------------------------------------------

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A KV cache holding no tokens: ``2 * n_layer`` arrays (batch, H, 0, D)."""
        return [np.zeros((batch, self.n_head, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layer)]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
        past: list[np.ndarray] | None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the model once: logits (B, T, V) and the cache grown by T tokens (``past`` None: empty)."""
        if past is None:
            past = self.empty_past(len(input_ids))
        ints = (np.asarray(a, np.int64) for a in (input_ids, attention_mask, position_ids))  # no copy if int64
        logits, *present = self.session.run(self._outputs, dict(zip(self._inputs, (*ints, *past))))
        return logits, present

    # --- text --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def token_text(self, token: int) -> str:
        """What one token stands for, alone (a byte of a longer character shows as U+FFFD)."""
        return self._token_bytes[token].decode("utf-8", errors="replace")

    def count_bytes(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes that ``ids`` stand for (the denominator of bits per byte)."""
        return sum(len(self._token_bytes[i]) for i in ids)

    def sampling(self, **overrides: Any) -> Sampling:
        """The model's default sampling (from the export) with ``overrides`` (None = keep)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        try:
            return self.default_sampling.replace(**changes)
        except ValidationError as exc:
            raise GenerationError(one_line(exc)) from None

    def generate(self, prompt: str, sampling: Sampling | None = None, stop: Sequence[str] = ()) -> GenerationResult:
        """Complete one prompt."""
        return self.generate_batch([prompt], sampling, stop)[0]

    def generate_batch(
        self, prompts: Sequence[str], sampling: Sampling | None = None, stop: Sequence[str] = ()
    ) -> list[GenerationResult]:
        """Complete several prompts in one batch (left-padded)."""
        return self.generate_tokens(self._encode_prompts(prompts), sampling, stop)

    def generate_tokens(
        self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling | None = None, stop: Sequence[str] = ()
    ) -> list[GenerationResult]:
        """Complete already-tokenized prompts (one list of ids per prompt)."""
        results: list[GenerationResult] = []
        for _ in self._run(prompt_ids, sampling, stop, results):
            pass
        return results

    def stream(
        self, prompt: str, sampling: Sampling | None = None, stop: Sequence[str] = (),
        results: list[GenerationResult] | None = None, blocked: regex.Pattern[str] | None = None,
    ) -> Iterator[str]:
        """Yield the completion as it is generated, in pieces of whole characters.

        The pieces join to ``generate(...).text``; pass a list as ``results`` to receive the
        :class:`GenerationResult` (finish reason, counts, timings) when the stream ends.
        ``blocked`` (:func:`openllm.decode.blocked_pattern`) ends the text before its first
        match, with ``finish_reason == "content_filter"``.
        """
        results = [] if results is None else results
        for _, piece in self._run(self._encode_prompts([prompt]), sampling, stop, results, blocked):
            yield piece

    # --- the generation loop -------------------------------------------------------------

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str) or not prompts:
            raise GenerationError("give a non-empty list of prompts")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt:
                raise GenerationError("the prompt is empty")
        return [self.encode(p) for p in prompts]

    def _check(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, stop: Sequence[str]) -> list[list[int]]:
        """Validate everything before the first model call; return the ids as plain lists."""
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise GenerationError("stop must be a list of non-empty strings")
        if not isinstance(sampling, Sampling):
            raise GenerationError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        if sampling.max_new_tokens > self.context_length - 1:
            raise GenerationError(
                f"max_new_tokens={sampling.max_new_tokens} is more than this model can ever write "
                f"(at most {self.context_length - 1}: its context is {self.context_length} tokens)"
            )
        if not prompt_ids:
            raise GenerationError("no prompts given")
        checked = []
        for ids in prompt_ids:
            ids = [int(i) for i in ids]
            if not ids:
                raise GenerationError("the prompt is empty")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise GenerationError(f"token ids must be in [0, {self.vocab_size})")
            checked.append(ids)
        return checked

    def new_row(
        self, prompt_ids: Sequence[int], sampling: Sampling, stop: Sequence[str] = (),
        blocked: regex.Pattern[str] | None = None, top_logprobs: int | None = None,
    ) -> Row:
        """A row for :class:`openllm.decode.DecodeBatch` that also assembles its text."""
        return Row(list(prompt_ids), sampling, TextAssembler(self._token_bytes, stop, blocked), top_logprobs)

    @property
    def engine(self) -> str:
        """What generates: "onnxruntime" (the decode loop here) or "genai" (onnxruntime-genai)."""
        return "onnxruntime" if self._genai is None else "genai"

    def decode_batch(self) -> DecodeBatch | GenaiBatch:
        """An empty decode loop over this model (rows may join it at any step), on its engine."""
        if self._genai is not None:
            return GenaiBatch(self._genai, self.context_length, self.eos_id, self.vocab_size)
        return DecodeBatch(self.forward, self.context_length, self.eos_id)

    def _run(
        self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling | None, stop: Sequence[str],
        results: list[GenerationResult], blocked: regex.Pattern[str] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yield ``(prompt index, new text)`` as text becomes final; append the results at the end."""
        sampling = self.default_sampling if sampling is None else sampling
        prompts = self._check(prompt_ids, sampling, stop)
        started = time.perf_counter()
        keep = self.context_length - 1  # an over-long prompt keeps its end, leaving room for one token
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        rows = [self.new_row(p[-keep:], sampling.replace(seed=seed), stop, blocked)
                for p, seed in zip(prompts, seeds)]
        batch = self.decode_batch()
        batch.add(rows)
        while batch.rows:
            batch.step()
            for i, row in enumerate(rows):
                for piece in row.take_pieces():
                    yield i, piece
        seconds = time.perf_counter() - started
        for prompt, row in zip(prompts, rows):
            results.append(GenerationResult(
                text=row.text.text, token_ids=row.tokens, prompt_tokens=len(row.prompt),
                completion_tokens=len(row.tokens), finish_reason=row.finish, seconds=seconds,
                time_to_first_token=min(r.first_token_seconds for r in rows),
                truncated_prompt_tokens=len(prompt) - len(row.prompt),
            ))

    # --- scoring -------------------------------------------------------------------------

    def score(self, text: str) -> dict[str, float]:
        """Loss (nats/token), perplexity and bits per byte of ``text`` under the model.

        Bits per byte = total nats / (ln 2 x UTF-8 bytes of the text): unlike the loss, it does
        not depend on the tokenizer. Same windows and formulas as the evaluate stage.
        """
        if not isinstance(text, str):
            raise GenerationError("the text to score must be a string")
        ids = self.encode(text)
        if len(ids) < 2:
            raise GenerationError("the text is too short to score (it needs at least 2 tokens)")
        total, count = self.score_ids(np.asarray(ids, np.int64))
        return language_metrics(total, count, len(text.encode("utf-8")))

    def score_ids(self, tokens: np.ndarray, batch_size: int = 8) -> tuple[float, int]:
        """Total negative log-likelihood (nats) of ``tokens[1:]`` and how many tokens that is.

        The ids are cut into consecutive windows of ``context_length``; each token but the first
        is predicted once, from the tokens before it in its window.
        """
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 1 or len(tokens) < 2:
            raise GenerationError("need a 1-D array of at least 2 token ids to score")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise GenerationError(f"token ids must be in [0, {self.vocab_size})")
        total, count = 0.0, 0
        for length, batch in score_windows(len(tokens), self.context_length, batch_size):
            window = np.stack([tokens[s : s + length + 1] for s in batch])  # (B, length + 1)
            B = len(batch)
            logits, _ = self.forward(window[:, :-1], np.ones((B, length), np.int64),
                                     np.broadcast_to(np.arange(length), (B, length)), self.empty_past(B))
            logits = logits.astype(np.float64)
            top = logits.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]  # log-sum-exp, (B, T)
            picked = np.take_along_axis(logits, window[:, 1:, None], axis=-1)[..., 0]
            total += float((log_z - picked).sum())
            count += B * length
        return total, count


def _load_genai(folder: Path, threads: int) -> Any:
    """The export's onnxruntime-genai model, or a :class:`ModelLoadError` that says why not."""
    if not (folder / GENAI_CONFIG).is_file():
        raise ModelLoadError(f"{folder}: no {GENAI_CONFIG}, so the genai engine cannot run it "
                             "(export with export.genai: true)")
    try:
        return load_genai_model(folder, threads)
    except ImportError:
        raise ModelLoadError("the genai engine needs the onnxruntime-genai package") from None
    except Exception as exc:  # onnxruntime-genai raises RuntimeError for bad folders
        raise ModelLoadError(f"{folder}: onnxruntime-genai cannot load it ({str(exc).splitlines()[0]})") from None


def _find(folder: Path, name: str) -> Path:
    """A file of the export; MLflow downloads keep the extra files in ``extra_files/``."""
    for candidate in (folder / name, folder / "extra_files" / name):
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{folder}: {name} is missing")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return read_manifest(folder, _find(folder, CONFIG_FILE)).to_dict()
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
