"""Typed, validated configuration loaded from ``params.yaml``.

``params.yaml`` is the only place values live. This module is the only code that reads it:
everything else receives a :class:`Params` object (or one of its sections). Every field is
checked up front, so a bad value fails with a message that names the field, the value and
what is allowed, before any stage writes or deletes a file.
"""

from __future__ import annotations

# Longer than the ~400 lines the project aims for, on purpose: one flat list of typed sections,
# each field with its bounds and description beside it, in params.yaml's order; split by section,
# it would scatter what a reader of params.yaml looks up in one place.

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import OpenLLMError
from .sampling import Sampling

MAX_SEED = 2**32 - 1  # every seed fits numpy's and torch's generators


class ConfigError(OpenLLMError, ValueError):
    """A params.yaml value (or a combination of values) is not allowed."""


class Section(BaseModel):
    # Unknown keys are errors: a typo such as `train.lerning_rate` must not be silently ignored.
    # Strict types: `true` or "40" is not an integer; numbers must be finite (no .inf, .nan).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class HFSource(Section):
    """A Hugging Face hub dataset (or one saved locally with ``save_to_disk``)."""

    dataset: str | None = Field(None, description="hub id (e.g. 'wikitext') or a local directory")
    config: str | None = Field(None, description="dataset configuration, e.g. 'wikitext-103-raw-v1'")
    split: str = Field("train", description="the training split")
    validation_split: str | None = Field(
        "validation", description="the dataset's own validation split; null = hash split"
    )
    text_column: str = Field("text", description="the column holding the text")
    revision: str | None = Field(None, description="a hub revision (branch, tag or commit) to pin")
    streaming: bool = Field(False, description="stream from the hub instead of downloading everything first")
    max_documents: int | None = Field(None, gt=0, description="cap on training documents")
    max_bytes: int | None = Field(None, gt=0, description="cap on training text, UTF-8 bytes")
    deduplicate: bool = Field(False, description="drop repeated documents (SQuAD contexts)")


class FilesSource(Section):
    """Local ``.txt``, ``.md`` (one document per file) or ``.jsonl`` (one per line) files."""

    glob: str | None = Field(None, description="files to read, inside data.folder, e.g. 'data/corpus/**/*.txt'")
    jsonl_text_key: str = Field("text", description="the text field of each .jsonl line")


class DataConfig(Section):
    source: Literal["shakespeare", "hf", "files"] = Field(
        "shakespeare", description="shakespeare (built in, offline) | hf (Hugging Face dataset) | files")
    folder: str = Field(
        "data/corpus", min_length=1, description="local input folder, a DVC dependency of the download stage: "
                                                 "files globs and local save_to_disk datasets must lie inside")
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="documents held out by hash when the source has no validation split")
    hf: HFSource = HFSource()
    files: FilesSource = FilesSource()

    @model_validator(mode="after")
    def _source_is_configured(self) -> "DataConfig":
        if self.source == "hf" and not self.hf.dataset:
            raise ValueError("data.source=hf needs data.hf.dataset (a hub id or a local directory)")
        if self.source == "files" and not self.files.glob:
            raise ValueError("data.source=files needs data.files.glob (e.g. 'data/corpus/*.txt')")
        if self.source == "files":
            _check_inside(self.files.glob, self.folder, "data.files.glob")
        if self.source == "hf" and Path(self.hf.dataset).is_dir():
            _check_inside(self.hf.dataset, self.folder, "data.hf.dataset")
        return self


def _check_inside(path: str, folder: str, field: str) -> None:
    """DVC can only notice a changed input inside the folder the download stage depends on."""
    parts, top = PurePath(path).parts, PurePath(folder).parts
    if ".." in parts:
        raise ValueError(f"{field}={path!r} must not contain '..'")
    if tuple(parts[: len(top)]) != tuple(top):
        raise ValueError(f"{field}={path!r} must lie inside data.folder={folder!r} (the download stage's "
                         "DVC dependency, so that DVC sees when the files change)")


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=262_144, description="SentencePiece pieces")
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece algorithm")
    training_sentences: int = Field(
        2_000_000, gt=0, description="lines sampled to train SentencePiece (bounds its memory)"
    )
    chunk_bytes: int = Field(1 << 20, gt=0, description="text per encoding task, bytes")
    workers: int = Field(0, ge=0, description="encoding processes; 0 = one per CPU core")


# Presets fix the shape of the network; the vocabulary comes from the tokenizer.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # ~1.3M parameters with a 4,096 vocabulary: the best validation bits per byte after
    # ~9 minutes of training on 2 CPU cores (bench/README.md, "Choosing the defaults").
    "micro": dict(n_layer=4, n_head=4, n_embd=128, intermediate_size=352, context_length=256),
    # ~5.9M parameters with a 4,096 vocabulary: trains on 2 CPU cores in minutes.
    "tiny": dict(n_layer=6, n_head=8, n_embd=256, intermediate_size=704, context_length=256),
    # The seed's model: ~35.8M parameters with a 32,000 vocabulary.
    "small": dict(n_layer=6, n_head=8, n_embd=512, intermediate_size=1408, context_length=1024),
}


class ModelConfig(Section):
    """A preset plus optional per-field overrides (null = take the preset's value)."""

    preset: Literal["micro", "tiny", "small"] = Field("micro", description="a shape from MODEL_PRESETS")
    n_layer: int | None = Field(None, gt=0, le=1024, description="transformer blocks")
    n_head: int | None = Field(None, gt=0, le=1024, description="attention heads per block")
    n_embd: int | None = Field(None, gt=0, le=65536, description="width of the residual stream")
    intermediate_size: int | None = Field(None, gt=0, le=262144, description="SwiGLU hidden width")
    context_length: int | None = Field(None, gt=1, le=1 << 20, description="tokens the model attends over")
    rope_theta: float = Field(10_000.0, gt=0, description="base of the rotary position frequencies")
    # Research levers (off by default); any of them but qk_norm on means no Hugging Face export.
    qk_norm: bool = Field(True, description="RMSNorm on each head's query and key before the rotary embedding")
    logit_softcap: float | None = Field(
        None, gt=0, description="soft-cap the output logits: cap x tanh(logits / cap); null = off")
    mlp: Literal["swiglu", "relu2"] = Field(
        "swiglu", description="feed-forward: swiglu (Llama), or relu2: down(relu(up(x))^2), no gate")
    value_embeds: bool = Field(
        False, description="a second token embedding whose vectors every layer adds (gated) to its attention values")

    def resolved(self) -> dict[str, int]:
        """The preset with overrides applied (without vocab_size)."""
        shape = dict(MODEL_PRESETS[self.preset])
        for key in shape:
            value = getattr(self, key)
            if value is not None:
                shape[key] = value
        return shape

    @model_validator(mode="after")
    def _shape_is_consistent(self) -> "ModelConfig":
        s = self.resolved()
        if s["n_embd"] % s["n_head"]:
            raise ValueError(
                f"model.n_embd={s['n_embd']} must be divisible by model.n_head={s['n_head']}"
            )
        if (s["n_embd"] // s["n_head"]) % 2:
            raise ValueError(
                f"model.n_embd/model.n_head={s['n_embd'] // s['n_head']} (head size) must be even "
                "for rotary position embeddings"
            )
        return self


class TrainConfig(Section):
    max_steps: int = Field(2400, gt=0, description="optimizer steps")
    checkpoint_steps: list[int] = Field(
        [300, 800, 1600, 2400], min_length=1, description="steps at which a checkpoint is kept"
    )
    batch_size: int = Field(8, gt=0, description="sequences per optimizer step (global)")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    optimizer: Literal["adamw", "muon"] = Field(
        "muon", description="muon: Muon on the hidden matrices, AdamW on embeddings and norms"
    )
    schedule: Literal["wsd", "cosine"] = Field(
        "wsd", description="wsd: warmup, stable at the peak, linear decay over the last decay_fraction "
                           "(a longer run extends a shorter one); cosine: decay from warmup to max_steps")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps spent decaying")
    learning_rate: float = Field(4e-3, gt=0, le=1.0, description="peak learning rate, after warmup")
    min_learning_rate: float = Field(4e-4, ge=0, description="learning rate at max_steps")
    warmup_steps: int = Field(50, ge=0, description="steps of linear warmup from 0")
    weight_decay: float = Field(0.1, ge=0, le=10, description="on matrices only")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW momentum (and Muon's)")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = off")
    eval_interval: int = Field(400, gt=0, description="steps between validation evaluations")
    eval_batches: int = Field(16, gt=0, description="validation batches per evaluation")
    early_stopping_patience: int = Field(
        0, ge=0, description="evaluations without improvement before stopping; 0 = off"
    )
    max_nonfinite_batches: int = Field(
        0, ge=0, description="non-finite losses skipped in a row before stopping; 0 = stop at once"
    )
    resume_interval: int = Field(200, gt=0, description="steps between resumable state saves")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where supported")
    compile: Literal["auto", "true", "false"] = Field(
        "auto", description="torch.compile; auto: on GPUs, and on CPUs with a C++ compiler")
    deterministic: bool = Field(
        True, description="bit-identical reruns on one machine (PyTorch's deterministic algorithms)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto: CUDA when present")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="model initialisation and data order")
    sample_tokens: int = Field(48, ge=0, description="tokens sampled at each evaluation")
    ema_decay: float | None = Field(
        0.999, gt=0, lt=1, description="keep an exponential moving average of the weights (fp32) with this decay; "
                                      "checkpoints and evaluations use it; null = off")
    window_start: Literal["random", "document"] = Field(
        "random", description="where training windows start: any token, or the first token of a document")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_yaml_bool(cls, value: Any) -> Any:
        # YAML (and `dvc exp run -S train.compile=false`) reads true/false as booleans.
        return str(value).lower() if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _steps_are_consistent(self) -> "TrainConfig":
        steps = self.checkpoint_steps
        if any(s <= 0 for s in steps):
            raise ValueError(f"train.checkpoint_steps={steps} must all be positive")
        if steps != sorted(set(steps)):
            raise ValueError(f"train.checkpoint_steps={steps} must be increasing, without repeats")
        if any(isinstance(s, bool) for s in steps):
            raise ValueError(f"train.checkpoint_steps={steps} must be integers")
        if steps[-1] > self.max_steps:
            raise ValueError(
                f"train.checkpoint_steps={steps} has a step beyond train.max_steps={self.max_steps}"
            )
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"train.min_learning_rate={self.min_learning_rate} must not exceed "
                f"train.learning_rate={self.learning_rate}"
            )
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must be below train.max_steps={self.max_steps}"
            )
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be divisible by "
                f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
        return self


class EvaluateConfig(Section):
    batch_size: int = Field(8, gt=0, description="windows per forward pass")
    max_tokens: int | None = Field(
        None, gt=1, description="score only the first N validation tokens (quick experiments); null = all")
    sliding_stride: float | None = Field(
        0.5, gt=0, le=1, description="also score with windows every this fraction of the context, each token "
                                     "with more context before it (val_bits_per_byte_sliding); null = off")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto: CUDA when present")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where supported (as in training), else fp32"
    )
    prompts: list[str] = Field(
        ["ROMEO:\n", "To be, or not to be", "KING HENRY V:\nOnce more"], min_length=1,
        description="prompts continued in the samples of every checkpoint"
    )
    sampling: Sampling = Sampling()  # also each export's default sampling

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> "EvaluateConfig":
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ValueError(f"evaluate.prompts[{i}] is empty")
        if self.sampling.seed is None:
            raise ValueError("evaluate.sampling.seed is null: the samples of a checkpoint must repeat, give a number")
        return self


class ExportConfig(Section):
    """The export stage: which model files to write next to model.onnx, and registration."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported graphs")
    quantize: bool = Field(True, description="also write an int8 model (dynamic quantisation)")
    genai: bool = Field(True, description="also write onnxruntime-genai configs and tokenizer files (BPE only)")
    huggingface: bool = Field(True, description="also write a Hugging Face transformers folder (BPE only)")
    register_model: bool = Field(
        True, description="log the export to MLflow as a text-generation model and register a version"
    )


class MlflowConfig(Section):
    """Where runs and models go in MLflow (the store: $MLFLOW_TRACKING_URI, else mlflow.db)."""

    experiment: str = Field("openllm", min_length=1, description="experiment of the training runs")
    registered_model: str = Field(
        "openllm-shakespeare", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="registered model whose versions are the exports",
    )


class PipelineConfig(Section):
    """The Prefect orchestration (pipelines/): schedules, retries and the deployments' name."""

    cron: str = Field("0 3 * * *", description="when the scheduled deployment retrains")
    data_check_cron: str | None = Field(
        "30 * * * *", description="when the data-check deployment looks for a changed source; null = never"
    )
    timezone: str = Field("UTC", description="IANA time zone of both crons")
    retries: int = Field(2, ge=0, le=10, description="per stage, on failure")
    retry_delay_seconds: int = Field(10, ge=0, description="wait before a retry")
    deployment: str = Field(
        "openllm", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="name of both deployments"
    )

    @model_validator(mode="after")
    def _schedule_is_valid(self) -> "PipelineConfig":
        for name in ("cron", "data_check_cron"):
            value = getattr(self, name)
            if value is not None and len(value.split()) != 5:
                raise ValueError(
                    f"pipeline.{name}={value!r} must have 5 fields (min hour day month weekday)"
                )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"pipeline.timezone={self.timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)"
            ) from None
        return self


class ServeConfig(Section):
    """The HTTP server (``openllm serve``): where it listens and what one request may ask for."""

    host: str = Field("127.0.0.1", min_length=1, description="127.0.0.1 = this machine only")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    max_prompt_tokens: int = Field(1024, gt=0, description="tokens in one prompt")
    max_tokens: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(65536, gt=0, description="request body size, checked before parsing")
    max_n: int = Field(4, gt=0, description="completions per prompt (n)")
    max_prompts: int = Field(8, gt=0, description="prompts in one request (prompt given as a list)")
    batch_size: int = Field(8, gt=0, le=256, description="choices generated together per model (decode steps shared)")
    engine: Literal["onnxruntime", "genai"] = Field(
        "onnxruntime", description="what generates: onnxruntime (decode steps shared by the batch) or genai "
                                   "(onnxruntime-genai, one generator per choice; no logprobs)")
    max_queued: int = Field(32, ge=0, description="requests waiting for a place in the batch; more get 429")
    request_timeout_seconds: float = Field(60.0, gt=0, description="time per request, waiting included; then 504")
    api_key_env: str = Field("OPENLLM_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="environment variable holding the bearer token; unset or empty = no auth")
    allow_unauthenticated: bool = Field(False, description="serve beyond loopback without an API key")
    output_filter: list[str] = Field([], description="regular expressions (case-insensitive) a completion must not "
                                                      "contain, here and in the app; a match ends it with "
                                                      "finish_reason content_filter")
    client_timeout_seconds: float = Field(10.0, gt=0, description="to send a request's headers, or its body; "
                                                                  "also how long an idle connection stays open")
    max_connections: int = Field(256, gt=0, description="open connections; beyond it requests get 503")
    max_header_bytes: int = Field(16384, ge=1024, description="request line and headers; larger gets 400")

    @field_validator("output_filter")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                if regex.compile(pattern).match(""):  # the module the filter runs with (partial matches)
                    raise ValueError(f"serve.output_filter[{i}]={pattern!r} matches empty text (it would block all)")
            except regex.error as exc:
                raise ValueError(f"serve.output_filter[{i}]={pattern!r} is not a regular expression ({exc})") from None
        return patterns


class AppConfig(Section):
    """The Streamlit comparison app (``make app``): request limits and where models come from."""

    max_prompt_chars: int = Field(2000, gt=0, description="characters in a prompt; longer is refused")
    max_prompt_tokens: int = Field(1024, gt=0, description="tokens in a prompt (each model's tokenizer)")
    max_new_tokens: int = Field(
        256, gt=0, le=4096, description="top of the max-new-tokens slider (also capped by each model's context)"
    )
    cached_models: int = Field(
        4, gt=0, le=64, description="onnxruntime sessions kept in memory; the least recently used goes"
    )
    engine: Literal["onnxruntime", "genai"] = Field(
        "onnxruntime", description="what generates: onnxruntime, or genai (onnxruntime-genai)")
    registered_model: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]+$", description="also list this MLflow registered model's versions"
    )
    mlflow_ui_url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="e.g. http://127.0.0.1:5000: run ids become links"
    )


class Params(Section):
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    mlflow: MlflowConfig = MlflowConfig()
    pipeline: PipelineConfig = PipelineConfig()
    serve: ServeConfig = ServeConfig()
    app: AppConfig = AppConfig()

    @model_validator(mode="after")
    def _model_fits_tokenizer(self) -> "Params":
        if self.model.resolved()["context_length"] < 2:
            raise ValueError("model.context_length must be at least 2")
        return self

    def section_hash(self, *names: str, exclude: tuple[str, ...] = ()) -> str:
        """sha256 of the named sections (dotted keys in ``exclude`` left out)."""
        data = {name: getattr(self, name).model_dump() for name in names}
        for dotted in exclude:
            section, key = dotted.split(".", 1)
            data[section].pop(key, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _describe(error: dict[str, Any]) -> str:
    """One readable line for one pydantic error: the dotted field, its value, the rule."""
    path = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key '{path}' (check the spelling; see params.yaml's comments)"
    if error["type"] == "missing":
        return f"'{path}' is required"
    if not path:  # a cross-field rule: its message already names the fields
        return message
    if message.startswith(path.split(".")[0] + ".") or message.startswith(path):
        return message
    return f"{path}={error.get('input')!r}: {message}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed YAML document."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def with_overrides(raw: Any, overrides: dict[str, Any]) -> Any:
    """``raw`` with dotted keys set (``{"train.max_steps": 800}``), as ``dvc exp run -S`` does."""
    for dotted, value in overrides.items():
        target = raw
        *sections, key = dotted.split(".")
        for section in sections:
            if not isinstance(target, dict):
                break
            target = target.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml`` (with dotted ``overrides`` applied); raise
    :class:`ConfigError` with a readable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the repository root)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if overrides and isinstance(raw, dict):
        raw = with_overrides(raw, overrides)
    return parse_params(raw, str(path))
