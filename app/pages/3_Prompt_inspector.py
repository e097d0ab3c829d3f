"""Prompt inspector: run a prompt through the model live and show the top SAE features per token."""

import streamlit as st

from workbench.app import cached, render

st.set_page_config(page_title="Prompt inspector", page_icon="⌨️", layout="wide")
st.title("Prompt inspector")
FEATURE_PAGE = "pages/1_Feature.py"
DEFAULT_PROMPT = "The Python Software Foundation License permits copying and modifying the software.\nfor line in open(path):"

path = cached.workspace_path()
names = cached.call(cached.sae_names, path)
if not names:
    st.info("No trained SAE in this workspace yet: train one with `workbench train`.")
    st.stop()

wanted = st.query_params.get("sae")
sae = st.selectbox("SAE", names, index=names.index(wanted) if wanted in names else 0)
top = st.slider("Top features per token", min_value=1, max_value=10, value=5)
text = st.text_area("Prompt", value=DEFAULT_PROMPT, height=120)
if not text.strip():
    st.info("Type a prompt to see which features fire on each token.")
    st.stop()

record = cached.call(cached.resolve, path, sae)
model_name = cached.call(cached.model_name, path, record.run_id)
st.caption(f"model `{model_name}` · hook `{record.hook}` · {record.arch}, {record.width} latents")
result = cached.call(cached.prompt_features, model_name, str(record.path), record.d_in, record.hook, text, top)

if result["truncated"]:
    st.warning(f"The prompt is longer than the model's context: only its first {len(result['tokens'])} tokens "
               "(after BOS) were run and are shown.")
if not result["tokens"]:
    st.info("The prompt has no tokens.")
    st.stop()

st.plotly_chart(render.prompt_heatmap(result), key="prompt_heatmap")

st.subheader("Per token")
table = [{"#": i, "token": render.visible(tok),
          **{f"top {j + 1}": f"{f} ({v:.2f})" if v > 0 else "" for j, (f, v) in enumerate(zip(fs, vs))}}
         for i, (tok, fs, vs) in enumerate(zip(result["tokens"], result["features"], result["values"]))]
st.dataframe(table, hide_index=True)

fired = sorted({f for fs, vs in zip(result["features"], result["values"]) for f, v in zip(fs, vs) if v > 0})
if fired:
    st.markdown("**Open a feature**")
    columns = st.columns(6)
    for i, f in enumerate(fired[:36]):
        with columns[i % 6]:
            st.page_link(FEATURE_PAGE, label=f"feature {f}", query_params={"sae": sae, "feature": str(f)})
