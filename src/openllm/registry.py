"""The MLflow Model Registry in one place: model URIs, version tags, aliases, logging, downloads.

Each exported checkpoint is one version of a registered model (``mlflow.registered_model``),
logged into the checkpoint's training run as a text-generation pyfunc model
(:mod:`openllm.text_model`) that carries the whole export folder, so that

- ``mlflow.pyfunc.load_model("models:/<name>@best").predict(...)`` and
  ``mlflow models serve -m models:/<name>@best`` turn prompts into text, and
- :func:`download_export` gives back the export folder that :class:`openllm.runtime.OnnxGenerator`,
  the server and the app load.

Version tags (:data:`FIGURE_TAGS` and the checksums) say which checkpoint a version is; the
aliases ``newest`` (highest step) and ``best`` (lowest bits per byte, else loss) are recomputed
after every registration. MLflow is imported inside the functions: serving a local export
never needs it.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Iterator

from .errors import OpenLLMError

PREFIX = "models:/"
ALIAS_NEWEST, ALIAS_BEST = "newest", "best"  # MLflow reserves the alias name "latest"
FIGURE_TAGS = ("step", "val_loss", "val_bits_per_byte")  # numeric version tags the aliases use
EXPORT_ARTIFACT = "export"  # the export folder's name inside the logged model's artifacts
TEXT_MODEL_FILE = Path(__file__).with_name("text_model.py")  # MLflow "model from code"
RUNTIME_REQUIREMENTS = ("numpy", "onnxruntime", "sentencepiece", "pydantic", "pyyaml")


class RegistryError(OpenLLMError):
    """The registry cannot be read or written, or has no such model, version or alias."""


def is_model_uri(spec: str | Path) -> bool:
    """True for ``models:/<name>@<alias>`` and ``models:/<name>/<version>``."""
    return str(spec).startswith(PREFIX)


def version_uri(name: str, version: int | str) -> str:
    return f"{PREFIX}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"{PREFIX}{name}@{alias}"


def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` on ``tracking_uri`` (default: the project's store, see :mod:`openllm.tracking`)."""
    from mlflow import MlflowClient

    from . import tracking

    uri = tracking_uri or tracking.tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_figures(model_version) -> dict[str, float]:
    """The numeric tags of a version (step, val_loss, val_bits_per_byte); hand-edited ones are skipped."""
    figures = {}
    for key in FIGURE_TAGS:
        try:
            figures[key] = float(model_version.tags[key])
        except (KeyError, ValueError):
            pass
    return figures


def list_versions(name: str, tracking_uri: str | None = None) -> list:
    """Every version of ``name``, oldest first."""
    try:
        versions = client(tracking_uri).search_model_versions(f"name='{name}'")
    except Exception as exc:  # MlflowException and database errors
        raise RegistryError(f"cannot read the MLflow registry at {tracking_uri or 'the project store'}: {exc}") from None
    return sorted(versions, key=lambda v: int(v.version))


# --- writing ---------------------------------------------------------------------------------


def register_export(export_dir: Path, run_id: str | None, name: str, tags: dict[str, Any],
                    example_prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """Log ``export_dir`` as a text-generation model into run ``run_id`` and register a version.

    ``tags`` (step, val_loss, val_bits_per_byte, checkpoint_sha256...) go on the version; an
    older version with the same ``checkpoint_sha256`` (a re-export) is deleted, so there is one
    version per checkpoint. Returns the version, run, URI and aliases.
    """
    from mlflow.exceptions import MlflowException

    try:
        return _register(Path(export_dir), run_id, name, tags, example_prompt, sampling)
    except MlflowException as exc:  # a store that cannot be reached or written, a bad name...
        raise RegistryError(f"MLflow registration failed: {exc.message}") from exc


def _register(export_dir: Path, run_id: str | None, name: str, tags: dict[str, Any],
              example_prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
    import mlflow

    from . import tracking

    with tracking.open_run(mlflow, run_id) as run, _staged(export_dir) as (staged, code):
        info = mlflow.pyfunc.log_model(
            name=f"model-step-{tags['step']}", python_model=str(TEXT_MODEL_FILE),
            artifacts={EXPORT_ARTIFACT: str(staged)}, code_paths=[str(code)],
            signature=text_signature(sampling), input_example=({"prompt": [example_prompt]}, {"max_new_tokens": 8}),
            pip_requirements=[f"{p}=={package_version(p)}" for p in RUNTIME_REQUIREMENTS],
            registered_model_name=name,
        )
        run_id = run.info.run_id
    registry = client()
    number = str(info.registered_model_version)
    for key, value in tags.items():
        registry.set_model_version_tag(name, number, key, str(value))
    for old in registry.search_model_versions(f"name='{name}'"):
        if str(old.version) != number and old.tags.get("checkpoint_sha256") == tags.get("checkpoint_sha256"):
            registry.delete_model_version(name, old.version)
    aliases = set_aliases(registry, name)
    return {"registered_model": name, "version": int(number), "run_id": run_id,
            "model_uri": version_uri(name, number), "aliases": aliases}


@contextmanager
def _staged(export_dir: Path) -> Iterator[tuple[Path, Path]]:
    """Copies of the export folder without ``hf/`` and of this package's sources (MLflow logs folders whole)."""
    with tempfile.TemporaryDirectory(prefix="openllm-register-") as tmp:
        staged, code = Path(tmp) / EXPORT_ARTIFACT, Path(tmp) / "openllm"
        shutil.copytree(export_dir, staged, ignore=shutil.ignore_patterns("hf"))
        shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield staged, code


def text_signature(sampling: dict[str, Any]):
    """Prompt column in, text column out; the sampling settings as parameters (export defaults)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"temperature": "double", "top_k": "long", "top_p": "double", "max_new_tokens": "long", "seed": "long"}
    params = [ParamSpec(key, kind, float(sampling[key]) if kind == "double" else int(sampling[key] or 0))
              for key, kind in kinds.items()]
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string", "text")]),
                          params=ParamSchema(params))


def set_aliases(registry, name: str) -> dict[str, int]:
    """Point ``newest`` and ``best`` at the right versions of ``name``; return them."""
    versions = [(int(v.version), version_figures(v)) for v in registry.search_model_versions(f"name='{name}'")]
    versions = [v for v in versions if "step" in v[1]]
    aliases: dict[str, int] = {}
    if versions:
        aliases[ALIAS_NEWEST] = max(versions, key=lambda v: (v[1]["step"], v[0]))[0]
        key = "val_bits_per_byte" if all("val_bits_per_byte" in f for _, f in versions) else "val_loss"
        scored = [v for v in versions if key in v[1]]
        if scored:
            aliases[ALIAS_BEST] = min(scored, key=lambda v: (v[1][key], -v[0]))[0]
    for alias, number in aliases.items():
        registry.set_registered_model_alias(name, alias, str(number))
    return aliases


# --- reading ---------------------------------------------------------------------------------


def model_name(uri: str) -> str:
    """The registered model's name in a ``models:/`` URI."""
    return _parse(uri)[0]


def resolve_version(uri: str, tracking_uri: str | None = None) -> str:
    """The version number ``uri`` names (an alias is looked up in the registry)."""
    name, alias, number = _parse(uri)
    if alias is None:
        return number
    try:
        return str(client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # MlflowException: unknown model or alias; database errors
        raise RegistryError(f"{uri}: not in the MLflow registry ({exc})") from None


def download_export(uri: str, destination: Path, tracking_uri: str | None = None) -> Path:
    """Download the version ``uri`` names into ``destination``; return its export folder.

    The version's own files are fetched (``get_model_version_download_uri``), so a store given
    as ``tracking_uri`` is used for both the registry and the artifacts.
    """
    import mlflow

    number = resolve_version(uri, tracking_uri)
    registry = client(tracking_uri)
    try:
        source = registry.get_model_version_download_uri(model_name(uri), number)
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination),
                                                          tracking_uri=registry.tracking_uri))
    except Exception as exc:  # MlflowException: unknown version, missing artifacts
        raise RegistryError(f"{uri}: cannot download from the MLflow registry ({exc})") from None
    for candidate in (folder / "artifacts" / EXPORT_ARTIFACT, folder / "extra_files", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise RegistryError(f"{uri}: the registered model holds no OpenLLM export")


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = str(uri).removeprefix(PREFIX)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, number = rest.rsplit("/", 1)
        if name and number.isdigit():
            return name, None, number
    raise RegistryError(f"{uri}: not a registry URI (models:/<name>@<alias> or models:/<name>/<version>)")
