"""Inspect page: what each checkpoint makes of one text, token by token.

- Surprisal: the text's tokens coloured by -log2 p(token | the tokens before) under each chosen
  checkpoint, side by side, with each one's bits per byte.
- Next tokens: at a chosen position, each checkpoint's most likely next tokens.
- Attention: the attention map of one layer and head (the export's ``model.attention.onnx``).

Token texts are HTML-escaped before they are coloured, so a prompt such as
``<script>alert(1)</script>`` is displayed, never run.
"""

from __future__ import annotations

import html

import altair as alt
import pandas as pd
import streamlit as st

import catalog
from openllm.errors import OpenLLMError
from openllm.inspection import InspectionError, TokenSurprisal, bits_per_byte, token_surprisals, top_next_tokens

DEFAULT_TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?"
MAX_PICKS = 4
TOP_K = 10
DARKEST_BITS = 16.0  # surprisal shown with the strongest colour
MAX_MAP_TOKENS = 64  # attention maps of longer texts show their first tokens


def visible(text: str) -> str:
    """A token's text, escaped for HTML, with spaces and newlines made visible."""
    return html.escape(text).replace(" ", "&nbsp;").replace("\n", "↵")


def coloured(tokens: list[TokenSurprisal]) -> str:
    """The tokens as HTML spans; the stronger the colour, the more surprising the token."""
    spans = []
    for token in tokens:
        bits = token.bits
        alpha = 0.0 if bits is None else min(1.0, bits / DARKEST_BITS)
        tip = "first token: not predicted" if bits is None else f"{bits:.2f} bits"
        spans.append(f'<span class="token" title="{tip}" style="background: rgba(230, 80, 20, {alpha:.2f}); '
                     f'border-right: 1px solid #ccc; font-family: monospace">{visible(token.text)}</span>')
    return f'<div class="surprisal" style="line-height: 1.9">{"".join(spans)}</div>'


def surprisal_columns(picked: list[catalog.Checkpoint], text: str, tracking_uri: str, max_tokens: int) -> dict:
    """One column per checkpoint with the coloured text; returns label -> (generator, tokens)."""
    loaded = {}
    for column, checkpoint in zip(st.columns(len(picked)), picked):
        column.subheader(checkpoint.label)
        try:
            generator = catalog.load_generator(checkpoint.spec, catalog.fingerprint(checkpoint), tracking_uri)
            if (count := len(generator.encode(text))) > max_tokens:
                raise InspectionError(f"The text is {count:,} tokens for this model; the limit is {max_tokens:,} "
                                      "(params.yaml `app.max_prompt_tokens`).")
            tokens = token_surprisals(generator, text)
            column.html(coloured(tokens))
            column.caption(f"{bits_per_byte(tokens):.3f} bits per byte · {len(tokens)} tokens")
            loaded[checkpoint.label] = (generator, tokens)
        except OpenLLMError as exc:
            column.error(str(exc))
    return loaded


def next_tokens(loaded: dict, text: str) -> None:
    """A position slider, then each checkpoint's top next tokens after that position."""
    st.subheader("Next token")
    first = next(iter(loaded.values()))[1]
    last = len(first) - 1
    position = st.slider("Position", 0, last, last, help="The token after which the models guess the next one.")
    st.caption(f"After token {position}: «{first[position].text}»")
    for column, (label, (generator, tokens)) in zip(st.columns(len(loaded)), loaded.items()):
        column.markdown(f"**{label}**")
        try:
            top = top_next_tokens(generator, text, min(position, len(tokens) - 1), TOP_K)
        except InspectionError as exc:
            column.error(str(exc))
            continue
        column.dataframe(pd.DataFrame(top, columns=["token", "probability"]).assign(
            token=lambda t: t["token"].str.replace("\n", "↵")), hide_index=True,
            column_config={"probability": st.column_config.ProgressColumn(format="%.3f", min_value=0, max_value=1)})


def attention_view(picked: list[catalog.Checkpoint], loaded: dict) -> None:
    """The attention map of one checkpoint, layer and head."""
    st.subheader("Attention")
    label = st.selectbox("Checkpoint", list(loaded), index=len(loaded) - 1, key="attention_checkpoint")
    checkpoint = next(c for c in picked if c.label == label)
    generator, tokens = loaded[label]
    try:
        model = catalog.load_attention(checkpoint.spec, catalog.fingerprint(checkpoint))
        maps = model.attention([t.token_id for t in tokens[:MAX_MAP_TOKENS]])  # (layers, heads, T, T)
    except OpenLLMError as exc:
        st.info(str(exc))
        return
    left, right = st.columns(2)
    layer = left.selectbox("Layer", range(maps.shape[0]), key="attention_layer")
    head = right.selectbox("Head", range(maps.shape[1]), key="attention_head")
    names = [f"{i} {t.text}".replace("\n", "↵") for i, t in enumerate(tokens[:MAX_MAP_TOKENS])]
    cells = pd.DataFrame([(names[i], names[j], float(maps[layer, head, i, j]))
                          for i in range(len(names)) for j in range(i + 1)], columns=["token", "looks at", "weight"])
    chart = alt.Chart(cells).mark_rect().encode(
        x=alt.X("looks at:N", sort=names), y=alt.Y("token:N", sort=names),
        color=alt.Color("weight:Q", scale=alt.Scale(domain=[0, 1], scheme="blues")),
        tooltip=["token", "looks at", alt.Tooltip("weight:Q", format=".3f")])
    st.altair_chart(chart, use_container_width=True)
    st.caption("Row i: how token i spreads its attention over the tokens up to itself (each row sums to 1)."
               + (f" The first {MAX_MAP_TOKENS} tokens only." if len(tokens) > MAX_MAP_TOKENS else ""))


root, settings, checkpoints = catalog.start_page("Inspect checkpoints")
st.caption("What each checkpoint expects, token by token: darker tokens surprised it more (hover for bits).")
by_label = {c.label: c for c in checkpoints}
labels = list(by_label)
picked = st.multiselect("Checkpoints", labels, default=list(dict.fromkeys([labels[0], labels[-1]])),
                        max_selections=MAX_PICKS, key="inspect_checkpoints")
text = st.text_area("Text", DEFAULT_TEXT, key="inspect_text",
                    help=f"Up to {settings.max_prompt_chars:,} characters and each model's context.")

if not picked:
    st.info("Pick at least one checkpoint.")
elif not text:
    st.info("Type a text: each checkpoint shows how surprising it finds every token.")
elif problem := catalog.prompt_limit_error(text, settings):
    st.error(problem)
else:
    loaded = surprisal_columns([by_label[p] for p in picked], text, catalog.tracking_uri(root),
                               settings.max_prompt_tokens)
    if loaded and len(next(iter(loaded.values()))[1]) > 0:
        next_tokens(loaded, text)
        attention_view([by_label[p] for p in picked], loaded)
