"""The Streamlit app (app/), page by page, with Streamlit's AppTest and two tiny real exports.

The app reads a temporary project (``OPENLLM_ROOT``): two checkpoints of a random tiny GPT
(steps 10 and 20) exported to ONNX, plus the metrics files the pipeline would write.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fixtures_export import build_checkpoint
from helpers import REPO_ROOT, write_params
from openllm.config import ExportConfig
from openllm.export import export_checkpoint
from openllm.runtime import OnnxGenerator
from openllm.sampling import Sampling

APP = REPO_ROOT / "app" / "streamlit_app.py"
CHECKPOINTS_PAGE = "views/checkpoints.py"
STEPS = (10, 20)
RUN_ID = "0123456789abcdef0123456789abcdef"
MLFLOW_UI = "http://127.0.0.1:5000"
LIMITS = {"max_prompt_chars": 200, "max_prompt_tokens": 40}
SCRIPT = "<script>alert(1)</script>"
# The exports' sampling (params.yaml evaluate.sampling): not the defaults, to see the app use it.
EXPORT_SAMPLING = Sampling(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=48, seed=3)


def make_project(root: Path) -> Path:
    """``root`` as a project after `make run`: exports of steps 10 and 20 and their metrics.

    Skips the exports already there, so that test files can share one folder per session.
    """
    for step in STEPS:
        out = root / "models" / "export" / f"step-{step}"
        if not out.is_dir():
            checkpoint = build_checkpoint(root / "models" / "checkpoints", step, val_loss=6.0 - step / 10, seed=step)
            options = ExportConfig(quantize=False, huggingface=False, register_model=False)
            export_checkpoint(checkpoint, out, options, EXPORT_SAMPLING, None)
    metrics = root / "metrics"
    (metrics / "evaluate").mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        loss = 6.0 - step / 10
        figures = {"step": step, "tokens_seen": step * 1024, "parameters": 43_000, "context_length": 128,
                   "val_loss": loss, "val_perplexity": 2.718281828**loss, "val_bits_per_byte": loss / 2,
                   "mlflow_run_id": RUN_ID, "bias_gap_mean_nats": step / 10 - 1.5}
        (metrics / "evaluate" / f"step-{step}.json").write_text(json.dumps(figures))
    (metrics / "train_steps.tsv").write_text(
        "step\ttrain_loss\tlearning_rate\tgrad_norm\ttokens_per_second\ttokens_seen\n"
        + "".join(f"{s}\t{6 - s / 10}\t0.002\t1.0\t5000\t{s * 1024}\n" for s in range(1, 21)))
    (metrics / "train_evals.tsv").write_text("step\tval_loss\tval_perplexity\n10\t5.1\t164\n20\t4.2\t66.7\n")
    write_params(root, {"app": {**LIMITS, "mlflow_ui_url": MLFLOW_UI}})
    return root


@pytest.fixture(scope="session")
def project(session_dir: Path) -> Path:
    return make_project(session_dir / "app-project")


@pytest.fixture
def app(project: Path, monkeypatch) -> AppTest:
    """The app on the temporary project, after its first run (the compare page)."""
    monkeypatch.setenv("OPENLLM_ROOT", str(project))
    return AppTest.from_file(str(APP), default_timeout=60).run()


def generate(app: AppTest, prompt: str) -> AppTest:
    """Type ``prompt`` and click Generate."""
    app.text_area[0].input(prompt)
    return app.button[0].click().run()


def shown(text: str) -> str:
    """``text`` as st.code displays it: without one leading and one trailing newline."""
    return re.sub(r"\n\Z", "", re.sub(r"\A\n", "", text))


def output_texts(app: AppTest) -> list[str]:
    """The text of each output column (code blocks inside columns; the prompt's is outside)."""
    return [code.value for column in app.columns for code in column.code]


def html_elements(app: AppTest) -> list[str]:
    """Everything the page renders as HTML: Markdown allowed to contain it, and st.html."""
    return [m.value for m in app.main.get("markdown") if m.allow_html] + [h.value for h in app.main.get("html")]


def test_no_models_says_how_to_build_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENLLM_ROOT", str(tmp_path))
    app = AppTest.from_file(str(APP), default_timeout=30).run()
    for _ in range(2):  # the compare page, then the checkpoints page
        assert not app.exception
        message = app.info[0].value
        assert "No exported models yet" in message and "make run" in message and "dvc repro" in message
        assert not app.button and not app.columns
        app.switch_page(CHECKPOINTS_PAGE).run()


def test_controls_start_at_the_export_sampling_within_sampling_bounds(app: AppTest) -> None:
    assert not app.exception
    picker = app.multiselect[0]
    assert picker.options == ["step-10", "step-20"] and picker.value == ["step-10", "step-20"]
    assert picker.proto.max_selections == 4
    defaults = EXPORT_SAMPLING
    temperature, top_p, max_new = app.sidebar.get("slider")
    assert (temperature.value, temperature.min, temperature.max) == (defaults.temperature, 0.0, 5.0)
    assert (top_p.value, top_p.min, top_p.max) == (defaults.top_p, 0.01, 1.0)
    assert (max_new.value, max_new.min, max_new.max) == (defaults.max_new_tokens, 1, 256)
    top_k, seed = app.sidebar.get("number_input")
    assert (top_k.value, top_k.min) == (defaults.top_k, 0)
    assert (seed.value, seed.min) == (defaults.seed, 0)
    assert "200 characters and 40 tokens" in app.text_area[0].help


def test_generates_side_by_side_with_the_runtime(app: AppTest, project: Path) -> None:
    app.sidebar.get("slider")[2].set_value(24)  # max new tokens
    app.sidebar.get("number_input")[1].set_value(7)  # seed
    generate(app, "ROMEO:\n")
    assert not app.exception and not app.error and not app.warning
    assert [c.value for c in app.subheader] == ["step-10", "step-20"]
    sampling = Sampling(**{**EXPORT_SAMPLING.model_dump(), "max_new_tokens": 24, "seed": 7})
    runs = [OnnxGenerator.load(project / "models" / "export" / f"step-{s}").generate("ROMEO:\n", sampling)
            for s in STEPS]
    expected = [shown(run.text) for run in runs]
    assert output_texts(app) == expected  # same seed and settings: the runtime's own text
    assert expected[0] != expected[1]
    notes = [caption.value for column in app.columns for caption in column.caption]
    assert len(notes) == 2
    for note, run in zip(notes, runs):
        assert note.startswith(f"{run.completion_tokens} new tokens · ") and "tokens/s" in note
    assert app.code[0].value == shown("ROMEO:\n")  # the prompt, above the columns
    app.run()  # any later rerun (a slider moved) keeps the last comparison on screen
    assert output_texts(app) == expected


def test_empty_prompt_warns_without_generating(app: AppTest) -> None:
    for prompt in ("", "  \n "):
        generate(app, prompt)
        assert not app.exception
        assert "Type a prompt" in app.warning[0].value
        assert not app.columns and not app.code


def test_a_prompt_over_the_limits_is_refused_in_python(app: AppTest) -> None:
    generate(app, "x" * (LIMITS["max_prompt_chars"] + 1))
    assert not app.exception and not app.columns
    assert "201 characters" in app.error[0].value and "app.max_prompt_chars" in app.error[0].value
    generate(app, "q " * 90)  # under the character limit, over 40 tokens
    assert not app.exception
    errors = [e.value for column in app.columns for e in column.error]
    assert len(errors) == 2 and all("app.max_prompt_tokens" in e for e in errors)
    assert not output_texts(app)


def test_emoji_and_other_scripts(app: AppTest) -> None:
    prompt = "Café 🙂🚀 東京は\u200b日本 — ∑ \x00"
    generate(app, prompt)
    assert not app.exception and not app.error
    assert app.code[0].value == prompt
    assert len(output_texts(app)) == 2


def test_html_in_the_prompt_is_shown_as_text(app: AppTest) -> None:
    generate(app, SCRIPT)
    assert not app.exception and not app.error
    assert app.code[0].value == SCRIPT  # displayed verbatim, as text
    assert len(output_texts(app)) == 2
    assert not any("<script" in html for html in html_elements(app))
    assert all("<script" not in m.value for m in app.main.get("markdown"))


def test_a_broken_export_shows_its_error_in_its_own_column(project: Path, tmp_path: Path, monkeypatch) -> None:
    export = tmp_path / "models" / "export"
    export.mkdir(parents=True)
    (export / "step-10").symlink_to(project / "models" / "export" / "step-10")
    (export / "step-30").mkdir()
    (export / "step-30" / "config.json").write_text("{not json")
    monkeypatch.setenv("OPENLLM_ROOT", str(tmp_path))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert app.multiselect[0].value == ["step-10", "step-30"]
    generate(app, "ROMEO:")
    assert not app.exception and len(output_texts(app)) == 1
    assert "step-30" in app.columns[1].error[0].value and "unreadable" in app.columns[1].error[0].value
    app.switch_page(CHECKPOINTS_PAGE).run()
    assert not app.exception and list(app.dataframe[0].value["checkpoint"]) == ["step-10", "step-30"]


def test_the_output_filter_applies_in_the_app(project: Path, tmp_path: Path, monkeypatch) -> None:
    """``serve.output_filter`` of params.yaml ends the app's text before a match, as in the server."""
    sampling = Sampling(**{**EXPORT_SAMPLING.model_dump(), "max_new_tokens": 24, "seed": 7})
    generator = OnnxGenerator.load(project / "models" / "export" / "step-10")
    full = generator.generate("ROMEO:\n", sampling).text
    word = next(full[i:i + 2] for i in range(3, len(full)) if full[i:i + 2].isalpha())
    cut = full[: full.index(word)]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "export").symlink_to(project / "models" / "export")
    write_params(tmp_path, {"app": LIMITS, "serve": {"output_filter": [re.escape(word.upper())]}})
    monkeypatch.setenv("OPENLLM_ROOT", str(tmp_path))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    app.sidebar.get("slider")[2].set_value(24)  # max new tokens
    app.sidebar.get("number_input")[1].set_value(7)  # seed
    generate(app, "ROMEO:\n")
    assert not app.exception and not app.error
    assert output_texts(app)[0] == shown(cut)  # step-10; step-20 writes other text
    assert "output filter" in app.columns[0].caption[0].value


def test_the_genai_engine_writes_the_columns_when_the_params_ask_for_it(project: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """``app.engine: genai``: onnxruntime-genai samples each column, so the text is its own for the seed."""
    sampling = EXPORT_SAMPLING.replace(temperature=1.0, max_new_tokens=24, seed=7)
    folders = [project / "models" / "export" / f"step-{step}" for step in STEPS]
    genai = [OnnxGenerator.load(f, engine="genai").generate("ROMEO:\n", sampling).text for f in folders]
    default = [OnnxGenerator.load(f).generate("ROMEO:\n", sampling).text for f in folders]
    assert genai != default  # each engine draws with its own random generator
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "export").symlink_to(project / "models" / "export")
    write_params(tmp_path, {"app": {**LIMITS, "engine": "genai"}})
    monkeypatch.setenv("OPENLLM_ROOT", str(tmp_path))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert "onnxruntime-genai" in app.caption[0].value
    app.sidebar.get("slider")[0].set_value(1.0)  # temperature
    app.sidebar.get("slider")[2].set_value(24)  # max new tokens
    app.sidebar.get("number_input")[1].set_value(7)  # seed
    generate(app, "ROMEO:\n")
    assert not app.exception and not app.error
    assert output_texts(app) == [shown(text) for text in genai]


def test_checkpoints_page(app: AppTest) -> None:
    app.switch_page(CHECKPOINTS_PAGE).run()
    assert not app.exception and not app.error
    table = app.dataframe[0].value
    assert list(table["checkpoint"]) == ["step-10", "step-20"]
    assert list(table["step"]) == list(STEPS)
    assert list(table["tokens seen"]) == [10_240, 20_480]
    assert list(table["val loss"]) == pytest.approx([5.0, 4.0])
    assert list(table["bits per byte"]) == pytest.approx([2.5, 2.0])
    assert list(table["context length"]) == [128, 128]
    assert list(table["bias gap (nats)"]) == pytest.approx([-0.5, 0.5])
    assert list(table["MLflow run"]) == [RUN_ID, RUN_ID]
    assert list(table["MLflow link"]) == [f"{MLFLOW_UI}/#/runs/{RUN_ID}"] * 2
    charts = app.main.get("vega_lite_chart")
    assert len(charts) == 2  # training curves, bits per byte against step


def test_registered_model_versions_are_listed_and_run(project: Path, tmp_path: Path, monkeypatch) -> None:
    """With ``app.registered_model``, each version is a ``models:/<name>/<version>`` choice."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store is tmp_path/mlflow.db
    monkeypatch.setenv("OPENLLM_ROOT", str(tmp_path))
    write_params(tmp_path, {"app": {"registered_model": "tiny"}})
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not app.exception
    assert "no MLflow store" in app.warning[0].value and "make run" in app.info[0].value

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("tiny")
    for step in STEPS:  # what the export stage registers, without its MLflow run
        client.create_model_version("tiny", str(project / "models" / "export" / f"step-{step}"),
                                    tags={"step": str(step), "val_loss": "4.5", "val_bits_per_byte": "2.25"})
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert app.multiselect[0].options == ["tiny v1", "tiny v2"]
    generate(app, "ROMEO:")
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert len(output_texts(app)) == 2
    app.switch_page(CHECKPOINTS_PAGE).run()
    table = app.dataframe[0].value
    assert list(table["step"]) == list(STEPS) and list(table["bits per byte"]) == [2.25, 2.25]


def test_generator_sessions_are_cached_and_bounded(project: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENLLM_ROOT", str(project))
    monkeypatch.syspath_prepend(str(APP.parent))
    import catalog

    folder = str(project / "models" / "export" / "step-10")
    checkpoint = catalog.export_checkpoints(project)[0]
    first = catalog.load_generator(folder, catalog.fingerprint(checkpoint), "")
    assert catalog.load_generator(folder, catalog.fingerprint(checkpoint), "") is first
    assert catalog.load_generator._info.max_entries == catalog.load_settings(project).cached_models


def test_the_app_never_imports_torch(project: Path, tmp_path: Path) -> None:
    """A fresh interpreter runs every page and a generation: PyTorch stays unloaded."""
    script = textwrap.dedent(f"""
        import sys
        from streamlit.testing.v1 import AppTest
        app = AppTest.from_file({str(APP)!r}, default_timeout=60).run()
        app.text_area[0].input("ROMEO:")
        app.button[0].click().run()
        assert len(app.columns) == 2 and not app.exception, app
        app.switch_page({CHECKPOINTS_PAGE!r}).run()
        assert not app.exception, app.exception
        app.switch_page("views/inspect.py").run()
        app.text_area[0].input("ROMEO:\\nBut, soft!").run()
        assert not app.exception and app.main.get("vega_lite_chart"), app
        print("torch" in sys.modules)
    """)
    env = {"OPENLLM_ROOT": str(project), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
