"""What the app works with: the exported checkpoints, their figures, and cached generators.

Shared by the pages (Streamlit puts this folder on ``sys.path``). Models run through
:mod:`openllm.runtime` (onnxruntime + numpy), so nothing here imports PyTorch.

Where things come from, below the project root (``$OPENLLM_ROOT``, else this repository):

- ``models/export/step-N/`` -- every export folder (``config.json`` tells step and sampling);
- the MLflow Model Registry -- every version of ``app.registered_model`` when params.yaml names
  one, as ``models:/<name>/<version>``;
- ``metrics/evaluate/step-N.json`` and ``metrics/train_*.tsv`` -- the figures and curves.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import regex
import streamlit as st

from openllm.config import AppConfig, ConfigError, Params, load_params
from openllm.decode import blocked_pattern
from openllm.fileio import read_json
from openllm.paths import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_DIR, parse_step
from openllm.inspection import AttentionModel, InspectionError
from openllm import registry, tracking
from openllm.manifest import ExportManifest, ManifestError
from openllm.registry import RegistryError
from openllm.runtime import CONFIG_FILE, REGISTRY_PREFIX, ModelLoadError, OnnxGenerator
from openllm.sampling import Sampling

ROOT_ENV = "OPENLLM_ROOT"  # point the app at another project (the tests use a temporary one)


@dataclass(frozen=True)
class Checkpoint:
    """One model the user can pick."""

    label: str  # what the user sees: "step-2400" or "openllm-shakespeare v3"
    spec: str  # what OnnxGenerator.load takes: a folder, or models:/<name>/<version>
    step: int | None
    config: dict[str, Any] | None = None  # the export's config.json; None for registry versions
    figures: dict[str, Any] = field(default_factory=dict)  # registry tags (step, val_loss, ...)
    run_id: str | None = None  # the MLflow run that trained it, when known


# --- settings -------------------------------------------------------------------------------


def project_root() -> Path:
    """The project whose models and metrics the app shows."""
    return Path(os.environ.get(ROOT_ENV) or Path(__file__).resolve().parents[1])


def project_params(root: Path) -> Params:
    """``root/params.yaml``, validated (the defaults without the file)."""
    path = root / "params.yaml"
    return load_params(path) if path.is_file() else Params()


def load_settings(root: Path) -> AppConfig:
    """The ``app`` section of ``root/params.yaml``."""
    return project_params(root).app


def output_filter(root: Path) -> regex.Pattern[str] | None:
    """The server's output filter (``serve.output_filter`` of ``root/params.yaml``): the app applies it too."""
    return blocked_pattern(project_params(root).serve.output_filter)


def _cache_size() -> int:
    # Read once, when the app starts: the cache below is created at import time.
    try:
        return load_settings(project_root()).cached_models
    except ConfigError:  # the pages report it; the cache just takes the default
        return AppConfig().cached_models


# --- discovery ------------------------------------------------------------------------------


def _step_of(folder: Path) -> int | None:
    return parse_step(folder.name)


def export_checkpoints(root: Path) -> list[Checkpoint]:
    """Every ``models/export/step-*`` folder, in step order.

    A folder whose config.json cannot be read is still listed: loading it then says why.
    """
    folders = [p for p in (root / EXPORT_DIR).glob("step-*") if p.is_dir()]
    folders.sort(key=lambda p: (_step_of(p) is None, _step_of(p) or 0, p.name))
    found = []
    run_id = tracking.read_run_id(root / CHECKPOINTS_DIR)  # the run that trained models/checkpoints
    for folder in folders:
        try:
            config = read_json(folder / CONFIG_FILE)
        except (OSError, ValueError):
            config = None
        try:
            ExportManifest.from_dict(config)
        except ManifestError:  # loading it says why
            config = None
        found.append(Checkpoint(folder.name, str(folder), _step_of(folder), config, run_id=run_id))
    return found


def tracking_uri(root: Path) -> str:
    """The MLflow store: ``$MLFLOW_TRACKING_URI``, else ``root/mlflow.db`` (as the pipeline writes)."""
    return tracking.tracking_uri(root)


@st.cache_data(ttl=60, show_spinner=False)  # an MLflow query per rerun would slow every click
def registry_checkpoints(name: str, uri: str) -> list[Checkpoint]:
    """Every version of the registered model ``name``, oldest first."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RegistryError(f"no MLflow store at {uri} (the export stage creates it)")
    found = []
    for v in registry.list_versions(name, uri):
        figures = registry.version_figures(v)
        step = int(figures["step"]) if "step" in figures else None
        found.append(Checkpoint(f"{name} v{v.version}", registry.version_uri(name, v.version), step,
                                figures=figures, run_id=v.run_id))
    return found


def discover(root: Path, settings: AppConfig) -> tuple[list[Checkpoint], list[str]]:
    """Every checkpoint the app can show, and the problems met while looking (as messages)."""
    found, problems = export_checkpoints(root), []
    if settings.registered_model:
        try:
            found += registry_checkpoints(settings.registered_model, tracking_uri(root))
        except RegistryError as exc:
            problems.append(str(exc))
    return found, problems


# --- models ---------------------------------------------------------------------------------


def fingerprint(checkpoint: Checkpoint) -> str:
    """Changes when an export folder is rewritten, so that a stale session is not reused.

    Registry versions never change, so their URI alone is enough.
    """
    config = Path(checkpoint.spec) / CONFIG_FILE
    if checkpoint.spec.startswith(REGISTRY_PREFIX) or not config.is_file():
        return ""
    return str(config.stat().st_mtime_ns)


@st.cache_resource(max_entries=_cache_size(), show_spinner=False)
def load_generator(spec: str, version: str, uri: str, engine: str = "onnxruntime") -> OnnxGenerator:
    """The generator of ``spec``, one onnxruntime session per (spec, version), shared by all users.

    ``version`` only keys the cache (see :func:`fingerprint`); ``engine`` is ``app.engine``.
    Registry versions are downloaded from the store ``uri`` into a temporary folder, loaded, and
    the download removed.
    """
    if not spec.startswith(REGISTRY_PREFIX):
        return OnnxGenerator.load(spec, engine=engine)
    with tempfile.TemporaryDirectory(prefix="openllm-app-") as tmp:
        try:
            folder = registry.download_export(spec, Path(tmp), tracking_uri=uri)  # from the store `uri`
        except RegistryError as exc:
            raise ModelLoadError(str(exc)) from None
        generator = OnnxGenerator.load(folder, engine=engine)  # everything is in memory afterwards
    generator.source = spec
    return generator


@st.cache_resource(max_entries=_cache_size(), show_spinner=False)
def load_attention(spec: str, version: str) -> AttentionModel:
    """The attention variant of an export folder (``model.attention.onnx``), cached like generators."""
    if spec.startswith(REGISTRY_PREFIX):
        raise InspectionError(f"{spec}: registered versions hold no attention model; pick an export folder")
    return AttentionModel(spec)


def default_sampling(checkpoints: list[Checkpoint]) -> Sampling:
    """The sampling the first export was made with (params.yaml ``evaluate.sampling``)."""
    for checkpoint in checkpoints:
        try:
            return Sampling(**checkpoint.config["sampling"])
        except (TypeError, KeyError, ValueError):  # no config (registry) or an odd one
            continue
    return Sampling()


def prompt_limit_error(prompt: str, settings: AppConfig) -> str | None:
    """Why ``prompt`` is too long to run, or None.

    Checked in Python before any tokenizer sees the text. (Token counts depend on each model's
    tokenizer: the compare page checks them per model.)
    """
    if len(prompt) > settings.max_prompt_chars:
        return (f"The prompt has {len(prompt):,} characters; the limit is {settings.max_prompt_chars:,} "
                "(params.yaml `app.max_prompt_chars`).")
    return None


# --- figures --------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def checkpoint_row(root: Path, checkpoint: Checkpoint, mlflow_ui_url: str | None) -> dict[str, Any]:
    """One line of the model page's table.

    Figures come from the evaluate stage (``metrics/evaluate/step-N.json``, the whole
    validation split) when it ran for this step, else from what the export or registry recorded.
    """
    config = checkpoint.config or {}
    known: dict[str, Any] = dict(checkpoint.figures)
    if config:  # the export's manifest: training metadata and the figures evaluated before the export
        known.update(ExportManifest.from_dict(config).figures())
    evaluation = root / METRICS_DIR / "evaluate" / f"step-{checkpoint.step}.json"
    if not checkpoint.spec.startswith(REGISTRY_PREFIX) and evaluation.is_file():  # a local export
        try:
            known.update(read_json(evaluation))
        except (OSError, ValueError):
            pass
    loss = _number(known.get("val_loss"))
    perplexity = _number(known.get("val_perplexity"))
    if perplexity is None and loss is not None:
        perplexity = math.exp(min(loss, 700.0))
    run_id = known.get("mlflow_run_id") or checkpoint.run_id
    row = {
        "checkpoint": checkpoint.label,
        "step": checkpoint.step,
        "tokens seen": known.get("tokens_seen"),
        "val loss": loss,
        "perplexity": perplexity,
        "bits per byte": _number(known.get("val_bits_per_byte")),
        "parameters": known.get("parameters"),
        "context length": known.get("context_length"),
        "bias gap (nats)": _number(known.get("bias_gap_mean_nats")),
        "MLflow run": run_id,
    }
    if mlflow_ui_url:
        row["MLflow link"] = f"{mlflow_ui_url.rstrip('/')}/#/runs/{run_id}" if run_id else None
    return row


def read_tsv(path: Path) -> pd.DataFrame | None:
    """A metrics table written by the train stage, or None when it is missing or unreadable."""
    try:
        return pd.read_csv(path, sep="\t")
    except (OSError, ValueError):  # missing, empty or cut short
        return None


# --- what every page starts with ----------------------------------------------------------------


def start_page(title: str) -> tuple[Path, AppConfig, list[Checkpoint]]:
    """Title, settings and checkpoints; stops the page with a message when there is nothing to show."""
    st.title(title)
    root = project_root()
    try:
        settings = load_settings(root)
    except ConfigError as exc:
        st.error(str(exc))
        st.stop()
    checkpoints, problems = discover(root, settings)
    for problem in problems:
        st.warning(problem)
    if not checkpoints:
        st.info(f"No exported models yet in `{root / EXPORT_DIR}`. Build them with `make run` "
                "(or `dvc repro`): it trains the default model and exports its checkpoints.")
        st.stop()
    return root, settings, checkpoints
