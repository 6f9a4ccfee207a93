"""Compare page: one prompt and one seed, 2-4 checkpoints, the outputs streamed side by side.

The prompt and every output are shown with ``st.code`` (plain text, never Markdown or HTML),
so a prompt such as ``<script>alert(1)</script>`` appears exactly as typed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import streamlit as st
from pydantic import ValidationError
from streamlit.delta_generator import DeltaGenerator

import catalog
from openllm.errors import OpenLLMError
from openllm.runtime import GenerationResult
from openllm.sampling import MAX_TEMPERATURE, Sampling, one_line

MAX_PICKS = 4
SEED_MAX = 2**31 - 1
FINISH = {"stop": "ended the text", "length": "reached the token limit",
          "content_filter": "stopped by the output filter (serve.output_filter)"}


@dataclass
class Output:
    """What one column shows (kept in the session, so it survives reruns)."""

    label: str
    text: str = ""
    note: str = ""  # new tokens, speed, why it stopped
    error: str | None = None


def within(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def sampling_controls(defaults: Sampling, max_new_tokens: int) -> Sampling:
    """The sidebar's sliders; bounds are Sampling's, defaults the export's own sampling."""
    st.sidebar.header("Sampling")
    temperature = st.sidebar.slider(
        "Temperature", 0.0, MAX_TEMPERATURE, within(float(defaults.temperature), 0.0, MAX_TEMPERATURE), 0.05,
        help="0 always takes the most likely token (greedy); higher values take more risks.",
    )
    top_k = st.sidebar.number_input(
        "Top-k", min_value=0, value=int(defaults.top_k), step=1,
        help="Choose among the k most likely tokens only; 0 = no limit.",
    )
    top_p = st.sidebar.slider(
        "Top-p", 0.01, 1.0, within(float(defaults.top_p), 0.01, 1.0), 0.01,
        help="Choose among the most likely tokens that together have this probability; 1 = no limit.",
    )
    new_tokens = st.sidebar.slider(
        "Max new tokens", 1, max_new_tokens, int(within(defaults.max_new_tokens, 1, max_new_tokens)),
        help="Each model also stops at its context length.",
    )
    seed = st.sidebar.number_input(
        "Seed", min_value=0, max_value=SEED_MAX, value=int(within(defaults.seed or 0, 0, SEED_MAX)), step=1,
        help="The same seed and settings give the same text: every checkpoint gets this one.",
    )
    try:
        return Sampling(temperature=temperature, top_k=int(top_k), top_p=top_p, max_new_tokens=new_tokens,
                        seed=int(seed))
    except ValidationError as exc:  # only a hand-made request gets past the widgets' bounds
        st.error(one_line(exc))
        st.stop()


def board(prompt: str, labels: list[str]) -> list[tuple[DeltaGenerator, DeltaGenerator]]:
    """The prompt, then one column per checkpoint; returns each column's (text, note) slots."""
    st.caption("Prompt")
    st.code(prompt, language=None, wrap_lines=True)
    slots = []
    for column, label in zip(st.columns(len(labels)), labels):
        column.subheader(label)
        slots.append((column.empty(), column.empty()))
    return slots


def show(slot: tuple[DeltaGenerator, DeltaGenerator], output: Output) -> None:
    text, note = slot
    if output.error:
        text.error(output.error)
    else:
        text.code(output.text, language=None, wrap_lines=True)
    if output.note:
        note.caption(output.note)


def describe(result: GenerationResult, seconds: float, capped: int | None) -> str:
    """The line under an output; speed counts only the time spent in this model."""
    parts = [f"{result.completion_tokens} new tokens", f"{result.completion_tokens / max(seconds, 1e-9):.0f} tokens/s",
             FINISH.get(result.finish_reason, result.finish_reason)]
    if capped is not None:
        parts.append(f"max new tokens capped at {capped} by the context")
    if result.truncated_prompt_tokens:
        parts.append(f"the first {result.truncated_prompt_tokens} prompt tokens did not fit the context")
    return " · ".join(parts)


def generate(checkpoints: list[catalog.Checkpoint], prompt: str, sampling: Sampling,
             max_prompt_tokens: int, root: Path, engine: str = "onnxruntime") -> list[Output]:
    """Stream every checkpoint's completion into its column; return what the columns show.

    The server's output filter applies here too: a text ends before its first match.
    """
    tracking_uri, blocked = catalog.tracking_uri(root), catalog.output_filter(root)
    slots = board(prompt, [c.label for c in checkpoints])
    outputs = [Output(c.label) for c in checkpoints]
    streams: dict[int, Iterator[str]] = {}
    results: dict[int, list[GenerationResult]] = {}
    capped: dict[int, int | None] = {}
    for i, checkpoint in enumerate(checkpoints):
        try:
            with st.spinner(f"Loading {checkpoint.label}..."):
                generator = catalog.load_generator(checkpoint.spec, catalog.fingerprint(checkpoint), tracking_uri,
                                                   engine)
            tokens = len(generator.encode(prompt))
            if tokens > max_prompt_tokens:
                raise OpenLLMError(f"The prompt is {tokens:,} tokens for this model; the limit is "
                                   f"{max_prompt_tokens:,} (params.yaml `app.max_prompt_tokens`).")
            limit = generator.context_length - 1
            capped[i] = limit if sampling.max_new_tokens > limit else None
            results[i] = []
            own = sampling.replace(max_new_tokens=min(sampling.max_new_tokens, limit))
            streams[i] = generator.stream(prompt, own, results=results[i], blocked=blocked)
        except OpenLLMError as exc:  # a model that cannot load or run: say so in its column
            outputs[i].error = str(exc)
            show(slots[i], outputs[i])

    # One piece from each model in turn, so that the columns grow together.
    seconds = dict.fromkeys(streams, 0.0)
    while streams:
        for i in list(streams):
            started, finished = time.perf_counter(), False
            try:
                outputs[i].text += next(streams[i])
            except StopIteration:
                finished = True
            except OpenLLMError as exc:  # e.g. settings this model cannot run
                finished, outputs[i].error = True, str(exc)
            seconds[i] += time.perf_counter() - started
            if finished:
                del streams[i]
                if results[i]:
                    outputs[i].note = describe(results[i][0], seconds[i], capped[i])
            show(slots[i], outputs[i])
    return outputs


root, settings, checkpoints = catalog.start_page("Compare checkpoints")
st.caption("The same prompt, settings and seed for every checkpoint: what differs is how long each model trained."
           + (" Generated with onnxruntime-genai (params.yaml `app.engine`)." if settings.engine == "genai" else ""))
by_label = {c.label: c for c in checkpoints}
labels = list(by_label)
sampling = sampling_controls(catalog.default_sampling(checkpoints), settings.max_new_tokens)

picked = st.multiselect(
    "Checkpoints", labels, default=list(dict.fromkeys([labels[0], labels[-1]])), max_selections=MAX_PICKS,
    help=f"Pick 2 to {MAX_PICKS}: export folders (models/export) and registered MLflow versions.",
)
# No max_chars: Streamlit would silently cut a pasted text; the check below says what is wrong.
prompt = st.text_area("Prompt", placeholder="ROMEO:",
                      help=f"Up to {settings.max_prompt_chars:,} characters and {settings.max_prompt_tokens:,} tokens.")
clicked = st.button("Generate", type="primary")

if clicked:
    st.session_state.pop("outputs", None)
    if len(picked) < min(2, len(labels)):
        st.warning("Pick at least two checkpoints to compare.")
    elif not prompt.strip():
        st.warning("Type a prompt first: each model continues the text you give it.")
    elif problem := catalog.prompt_limit_error(prompt, settings):
        st.error(problem)
    else:
        outputs = generate([by_label[p] for p in picked], prompt, sampling, settings.max_prompt_tokens, root,
                           settings.engine)
        st.session_state["outputs"] = (prompt, outputs)
elif "outputs" in st.session_state:  # the last comparison stays on screen while settings change
    last_prompt, outputs = st.session_state["outputs"]
    for slot, output in zip(board(last_prompt, [o.label for o in outputs]), outputs):
        show(slot, output)
