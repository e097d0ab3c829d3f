"""Prompt inspector: run a prompt through the model live and show the top SAE features per token."""

import streamlit as st

from workbench.app import cached, features_view, render

st.set_page_config(page_title="Prompt inspector", page_icon="⌨️", layout="wide")
st.title("Prompt inspector")
FEATURE_PAGE = "pages/1_Feature.py"
MAX_ROWS = 40  # heatmap rows
MAX_LINKS = 36  # "open a feature" links
DEFAULT_PROMPT = "The Python Software Foundation License permits copying and modifying the software.\nfor line in open(path):"

path = cached.workspace_path()
names = cached.sae_names_or_stop(path, "train one with `workbench train`")

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

labels = cached.label_map(path, sae)
order = render.heatmap_order(result)  # every feature in a top list, strongest first
fig = render.prompt_heatmap(result, MAX_ROWS, labels)
event = st.plotly_chart(fig, key="prompt_heatmap", on_select="rerun", selection_mode="points")
st.caption((f"The {MAX_ROWS} strongest of {len(order)} features" if len(order) > MAX_ROWS else f"All {len(order)} features")
           + " in any token's top list, by their largest activation (rows); a blank cell: not in that token's top list. "
           "Click a cell to open its feature.")
clicked = features_view.selected_feature(event, [])
if clicked is not None:
    st.switch_page(FEATURE_PAGE, query_params={"sae": sae, "feature": str(clicked)})


def cell(f: int, v: float) -> str:
    entry = labels.get(f)
    return f"{f} · {render.short(entry[0], 24)} ({v:.2f})" if entry else f"{f} ({v:.2f})"


st.subheader("Per token")
table = [{"#": i, "token": render.visible(tok),
          **{f"top {j + 1}": cell(f, v) if v > 0 else "" for j, (f, v) in enumerate(zip(fs, vs))}}
         for i, (tok, fs, vs) in enumerate(zip(result["tokens"], result["features"], result["values"]))]
st.dataframe(table, hide_index=True)

if order:
    st.markdown("**Open a feature**" + (f" (the {MAX_LINKS} strongest of {len(order)})" if len(order) > MAX_LINKS else ""))
    columns = st.columns(4)
    for i, f in enumerate(order[:MAX_LINKS]):
        with columns[i % 4]:
            st.page_link(FEATURE_PAGE, label=cached.feature_name(f, labels), query_params={"sae": sae, "feature": str(f)})
