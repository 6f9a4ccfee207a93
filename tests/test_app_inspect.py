"""The app's Inspect page (app/views/inspect.py) with Streamlit's AppTest, on test_app's project.

The page's figures are compared with openllm.inspection run directly on the same exports.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from test_app import APP, SCRIPT, STEPS, html_elements, project  # noqa: F401 (project is a fixture)
from openllm.inspection import AttentionModel, bits_per_byte, token_surprisals, top_next_tokens
from openllm.runtime import OnnxGenerator

INSPECT_PAGE = "views/inspect.py"
TEXT = "ROMEO:\nBut, soft! what light"  # within the project's 40-token limit


@pytest.fixture
def page(project: Path, monkeypatch) -> AppTest:  # noqa: F811
    monkeypatch.setenv("OPENLLM_ROOT", str(project))
    app = AppTest.from_file(str(APP), default_timeout=60).run().switch_page(INSPECT_PAGE).run()
    assert app.text_area[0].value.startswith("ROMEO:\nBut, soft!")  # a line of the plays to start with
    return app.text_area[0].input(TEXT).run()


def generators(project: Path) -> list[OnnxGenerator]:  # noqa: F811
    return [OnnxGenerator.load(project / "models" / "export" / f"step-{s}") for s in STEPS]


def test_surprisal_of_each_checkpoint_side_by_side(page: AppTest, project: Path) -> None:  # noqa: F811
    assert not page.exception and not page.error, [e.value for e in page.error]
    assert page.multiselect[0].value == [f"step-{s}" for s in STEPS]
    columns = page.columns[:2]
    assert [c.subheader[0].value for c in columns] == [f"step-{s}" for s in STEPS]
    for column, generator in zip(columns, generators(project)):
        tokens = token_surprisals(generator, TEXT)
        caption = column.caption[0].value
        assert caption.startswith(f"{bits_per_byte(tokens):.3f} bits per byte") and f"{len(tokens)} tokens" in caption
        shown = column.get("html")[0].value
        assert shown.count('class="token"') == len(tokens)
        assert f'title="{tokens[5].bits:.2f} bits"' in shown


def test_top_next_tokens_at_the_chosen_position(page: AppTest, project: Path) -> None:  # noqa: F811
    page.slider[0].set_value(3).run()
    assert not page.exception
    tables = [frame.value for frame in page.dataframe]
    assert len(tables) == 2
    for table, generator in zip(tables, generators(project)):
        want = top_next_tokens(generator, TEXT, 3, 10)
        assert list(table["probability"]) == pytest.approx([p for _, p in want])


def test_attention_map_of_a_layer_and_head(page: AppTest, project: Path) -> None:  # noqa: F811
    assert page.main.get("vega_lite_chart"), "no attention chart"
    page.selectbox(key="attention_layer").set_value(1).run()
    page.selectbox(key="attention_head").set_value(2).run()
    assert not page.exception and not page.error
    spec = page.main.get("vega_lite_chart")[0].proto.spec
    generator = generators(project)[-1]
    maps = AttentionModel(project / "models" / "export" / f"step-{STEPS[-1]}").attention(generator.encode(TEXT))
    # The chart's data is the lower triangle of layer 1, head 2: its first weight is always 1.
    assert math.isclose(float(maps[1, 2, 0, 0]), 1.0, rel_tol=1e-5) and '"weight"' in spec


def test_html_in_the_text_is_displayed_not_run(page: AppTest) -> None:
    page.text_area[0].input(SCRIPT).run()
    assert not page.exception
    shown = "".join(html_elements(page))
    assert "<script" not in shown and "</script" not in shown
    assert "&lt;" in shown  # the angle brackets are shown as text in the token spans


def test_a_text_over_the_limits_is_refused(page: AppTest, project: Path) -> None:  # noqa: F811
    page.text_area[0].input("x" * 201).run()  # test_app's project allows 200 characters
    assert not page.exception and "200" in page.error[0].value
    assert not page.get("html")
    page.text_area[0].input("ab " * 60).run()  # and 40 tokens: each column says so
    count = len(generators(project)[0].encode("ab " * 60))
    assert [e.value for e in page.error] == [f"The text is {count} tokens for this model; the limit is 40 "
                                             "(params.yaml `app.max_prompt_tokens`)."] * 2


def test_an_export_without_attention_model_says_how_to_get_one(project: Path, tmp_path: Path,  # noqa: F811
                                                               monkeypatch) -> None:
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    for step in STEPS:
        (copy / "models" / "export" / f"step-{step}" / "model.attention.onnx").unlink()
    monkeypatch.setenv("OPENLLM_ROOT", str(copy))
    page = AppTest.from_file(str(APP), default_timeout=60).run().switch_page(INSPECT_PAGE).run()
    page.text_area[0].input(TEXT).run()
    assert not page.exception and len(page.dataframe) == 2  # surprisal and next tokens still work
    assert any("export the checkpoint again" in i.value for i in page.info)
