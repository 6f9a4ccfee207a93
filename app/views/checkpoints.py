"""Checkpoints page: every checkpoint's figures, the training curves and the MLflow runs.

The figures are the evaluate stage's (``metrics/evaluate/step-N.json``); the curves come from
the logs the train stage writes (``metrics/train_steps.tsv``, ``metrics/train_evals.tsv``).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

import catalog
from openllm.paths import METRICS_DIR

root, settings, checkpoints = catalog.start_page("Checkpoints")
rows = pd.DataFrame([catalog.checkpoint_row(root, c, settings.mlflow_ui_url) for c in checkpoints])
columns = {
    "step": st.column_config.NumberColumn(format="%d"),
    "tokens seen": st.column_config.NumberColumn(format="localized"),
    "val loss": st.column_config.NumberColumn(format="%.3f", help="nats per token on the validation split"),
    "perplexity": st.column_config.NumberColumn(format="%.1f", help="exp(val loss)"),
    "bits per byte": st.column_config.NumberColumn(
        format="%.3f", help="loss per UTF-8 byte: compares models with different tokenizers"),
    "parameters": st.column_config.NumberColumn(format="localized"),
    "context length": st.column_config.NumberColumn(format="%d"),
    "bias gap (nats)": st.column_config.NumberColumn(
        format="%+.2f", help="bias probe: mean of log p(masculine) - log p(feminine) over its minimal pairs; "
                             "> 0 leans masculine (see the docs, chapter 5, for what it cannot tell)"),
    "MLflow run": st.column_config.TextColumn(help="the training run the checkpoint came from"),
}
if settings.mlflow_ui_url:
    columns["MLflow link"] = st.column_config.LinkColumn(display_text="open")
st.dataframe(rows, hide_index=True, column_config=columns)
if not settings.mlflow_ui_url:
    st.caption("Set params.yaml `app.mlflow_ui_url` (e.g. http://127.0.0.1:5000 for `mlflow ui`) "
               "to link each run.")

left, right = st.columns(2)
with left:
    st.subheader("Training curves")
    steps = catalog.read_tsv(root / METRICS_DIR / "train_steps.tsv")
    evals = catalog.read_tsv(root / METRICS_DIR / "train_evals.tsv")
    curves = [t[["step", c]].rename(columns={c: "loss"}).assign(curve=c)
              for t, c in ((steps, "train_loss"), (evals, "val_loss")) if t is not None and c in t]
    if curves:
        # Long format (one row per point): the two curves have points at different steps.
        st.line_chart(pd.concat(curves).dropna(), x="step", y="loss", color="curve", x_label="step")
    else:
        st.info("No training log yet: the train stage writes metrics/train_steps.tsv.")
with right:
    st.subheader("Bits per byte")
    points = rows.dropna(subset=["step", "bits per byte"]).drop_duplicates("step")
    if len(points):
        st.line_chart(points, x="step", y="bits per byte", x_label="checkpoint step")
    else:
        st.info("No evaluation yet: the evaluate stage writes metrics/evaluate/step-N.json.")
