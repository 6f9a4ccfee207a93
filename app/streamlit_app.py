"""OpenLLM in the browser: compare how checkpoints continue the same prompt.

Run it with ``make app`` (``streamlit run app/streamlit_app.py``). Three pages:

- Compare (views/compare.py): pick 2-4 checkpoints, type a prompt, stream the outputs side by side;
- Checkpoints (views/checkpoints.py): each checkpoint's figures, training curves, MLflow runs;
- Inspect (views/inspect.py): a text's tokens coloured by surprisal per checkpoint, the top next
  tokens at a position, attention maps per layer and head.

``OPENLLM_ROOT`` points it at another project folder (models/export, metrics, params.yaml).
"""

import streamlit as st

st.set_page_config(page_title="OpenLLM", page_icon=":material/compare_arrows:", layout="wide")
pages = [
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", default=True),
    st.Page("views/checkpoints.py", title="Checkpoints", icon=":material/table_chart:"),
    st.Page("views/inspect.py", title="Inspect", icon=":material/search:"),
]
st.navigation(pages).run()
