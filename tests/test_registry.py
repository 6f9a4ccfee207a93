"""Tests for openllm.registry and openllm.text_model: versions, aliases, the pyfunc text model, a live ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from fixtures_export import build_checkpoint
from helpers import free_port, subprocess_env
from openllm import registry, tracking
from openllm.config import ExportConfig, MlflowConfig
from openllm.export import export_checkpoint
from openllm.fileio import read_json, write_json
from openllm.runtime import ModelLoadError, OnnxGenerator
from openllm.sampling import Sampling

NAME = "tiny-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Two checkpoints of one training run, exported and registered: step 20 is newer but worse."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the export stage and the runtime read it
    mlflow_cfg = MlflowConfig(experiment="export-test", registered_model=NAME)
    mlflow = tracking.setup(mlflow_cfg.experiment)
    with mlflow.start_run() as run:  # the "training run" that export logs into
        training_run = run.info.run_id
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    tracking.write_run_id(checkpoints, training_run)
    cfg = ExportConfig(quantize=False, huggingface=False, register_model=True)
    reports = {}
    for step, val_loss, bpb in ((10, 4.0, 2.5), (20, 4.5, 2.75)):
        folder = build_checkpoint(checkpoints, step=step, val_loss=val_loss, seed=step)
        metrics = root / "metrics" / f"step-{step}.json"
        write_json(metrics, {"val_loss": val_loss, "val_bits_per_byte": bpb, "val_perplexity": 2.0})
        reports[step] = export_checkpoint(folder, root / "export" / f"step-{step}", cfg, Sampling(),
                                          mlflow_cfg, metrics_path=metrics)
    yield {"root": root, "uri": uri, "run": training_run, "reports": reports, "mlflow": mlflow, "cfg": cfg,
           "mlflow_cfg": mlflow_cfg, "checkpoints": checkpoints}
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_versions_tags_and_aliases(store: dict) -> None:
    root, reports = store["root"], store["reports"]
    for step, report in reports.items():
        assert report["mlflow"]["run_id"] == store["run"]
        # the export folder is a DVC output: registry versions (which differ per run) stay out of it
        assert "mlflow" not in read_json(root / "export" / f"step-{step}" / "export.json") and report["mlflow"]
    versions = {int(v.version): v for v in registry.list_versions(NAME)}
    assert len(versions) == 2 and all(v.run_id == store["run"] for v in versions.values())
    by_step = {int(v.tags["step"]): number for number, v in versions.items()}
    assert registry.version_figures(versions[by_step[10]]) == {"step": 10.0, "val_loss": 4.0, "val_bits_per_byte": 2.5}
    assert registry.resolve_version(registry.alias_uri(NAME, registry.ALIAS_NEWEST)) == str(by_step[20])
    assert registry.resolve_version(registry.alias_uri(NAME, registry.ALIAS_BEST)) == str(by_step[10])
    # The manifest carries the evaluation figures (the training run is the registry's to say).
    manifest = OnnxGenerator.load(root / "export" / "step-10").manifest
    assert manifest.evaluation["val_bits_per_byte"] == 2.5


def test_reexport_replaces_the_version_and_aliases_follow(store: dict) -> None:
    root = store["root"]
    before = {int(v.version) for v in registry.list_versions(NAME)}
    again = export_checkpoint(store["checkpoints"] / "step-10", root / "export" / "step-10", store["cfg"],
                              Sampling(), store["mlflow_cfg"], metrics_path=root / "metrics" / "step-10.json")
    after = {int(v.version) for v in registry.list_versions(NAME)}
    assert len(after) == 2 and again["mlflow"]["version"] == max(after) > max(before)
    assert registry.resolve_version(f"models:/{NAME}@best") == str(again["mlflow"]["version"])


def test_runtime_loads_registry_uris(store: dict) -> None:
    generator = OnnxGenerator.load(f"models:/{NAME}@best")
    assert generator.config["step"] == 10 and generator.registry_version == registry.resolve_version(f"models:/{NAME}@best")
    assert generator.generate("Hello", Sampling(temperature=0.0, max_new_tokens=5)).completion_tokens > 0
    newest = registry.resolve_version(f"models:/{NAME}@newest")
    assert OnnxGenerator.load(f"models:/{NAME}/{newest}").config["step"] == 20
    for bad in (f"models:/{NAME}@nonexistent", f"models:/{NAME}/999", "models:/", f"models:/{NAME}"):
        with pytest.raises(ModelLoadError, match="registry"):
            OnnxGenerator.load(bad)


def test_pyfunc_model_takes_prompts_and_sampling_and_returns_text(store: dict) -> None:
    import mlflow

    uri = f"models:/{NAME}@best"
    info = mlflow.models.get_model_info(uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["prompt"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["text"]
    assert {p.name for p in info.signature.params} == {"temperature", "top_k", "top_p", "max_new_tokens", "seed"}
    assert info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model(uri)
    ours = OnnxGenerator.load(uri)
    prompts = ["ROMEO:\n", "Hello"]
    got = model.predict({"prompt": prompts}, params={"temperature": 0.0, "max_new_tokens": 12})
    assert list(got) == [r.text for r in ours.generate_batch(prompts, ours.sampling(temperature=0.0, max_new_tokens=12))]
    # Sampling with the export's defaults and a seed is reproducible.
    frame = pd.DataFrame({"prompt": ["Hello"]})
    sampled = [model.predict(frame, params={"seed": 7, "max_new_tokens": 10}) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0][0] == ours.generate("Hello", ours.sampling(seed=7, max_new_tokens=10)).text


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_generates_text(store: dict) -> None:
    port = free_port()
    log = store["root"] / "serve.log"
    command = [str(Path(os.sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@best",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=subprocess_env(MLFLOW_TRACKING_URI=store["uri"]))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/invocations"
        answer = _post(url, {"inputs": {"prompt": ["ROMEO:\n"]}, "params": {"temperature": 0.0, "max_new_tokens": 12}})
        ours = OnnxGenerator.load(f"models:/{NAME}@best")
        assert answer == {"predictions": [ours.generate("ROMEO:\n", ours.sampling(temperature=0.0, max_new_tokens=12)).text]}
        records = _post(url, {"dataframe_records": [{"prompt": "Hi"}, {"prompt": "Ho"}], "params": {"max_new_tokens": 4}})
        assert len(records["predictions"]) == 2 and all(isinstance(t, str) for t in records["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
