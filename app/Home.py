"""Workspace page: what the workspace named by WORKBENCH_DB holds (runs, corpora, hooks, SAEs).

Served by `workbench app --db W`; the other pages are in pages/.
"""

import streamlit as st

from workbench.app import cached

st.set_page_config(page_title="Workspace", page_icon="🔎", layout="wide")
st.title("Workspace")

path = cached.workspace_path()
info = cached.call(cached.overview, path)
st.caption(f"`{path}` · schema v{info['schema']}")

st.subheader("Models and cache runs")
if info["runs"]:
    st.dataframe(info["runs"], hide_index=True)
else:
    st.info("No cache runs yet: cache activations with `workbench cache --model M --hook H --db W`.")

left, right = st.columns(2)
with left:
    st.subheader("Corpora")
    st.dataframe(info["corpora"], hide_index=True)
with right:
    st.subheader("Hooks cached")
    st.dataframe(info["hooks"], hide_index=True)

st.subheader("Sparse dictionaries")
METRICS = {  # metric key in the saes table -> column title
    "l0": "L0", "fvu": "FVU", "explained_variance": "explained var.", "dead_fraction": "dead",
    "dense_fraction_1pct": "dense >1%", "dense_fraction_10pct": "dense >10%", "ce_loss_recovered": "CE loss recovered",
    "kl_clean_spliced": "KL", "train_tokens": "train tokens",
}
DETAILS = {"explained_variance": "explained var.", "train_tokens": "train tokens"}  # shown under "More columns"
SHORT = {"dense >1%": ">1%", "dense >10%": ">10%", "CE loss recovered": "CE rec."}  # column titles in the narrow table
if not info["saes"]:
    st.info("No SAEs yet: train one with `workbench train --db W --hook H --arch topk --width F --k K --tokens N`.")
else:
    rows, details = [], []
    for s in info["saes"]:
        row = {"name": s["name"], "dictionary": f"{s['arch']} · {s['width']:,}" + (f" · k={s['k']}" if s["k"] else "")}
        row["analysed"] = info["analysed"].get(s["sae_id"], "no")
        row.update({title: s["metrics"].get(key) for key, title in METRICS.items() if key not in DETAILS})
        rows.append(row)
        details.append({"name": s["name"], "id": s["sae_id"], "hook": s["hook"], "arch": s["arch"], "width": s["width"],
                        "k": s["k"], "status": s["status"], **{title: s["metrics"].get(key) for key, title in DETAILS.items()}})
    # Every column fits the page: three-digit numbers in narrow columns, short titles (the full name on hover),
    # and the rest under "More columns" below.
    number = {title: st.column_config.NumberColumn(SHORT.get(title, title), format="%.3g", width="small", help=title)
              for key, title in METRICS.items() if key not in DETAILS}
    st.dataframe(rows, hide_index=True, width="stretch", column_config={
        **number, "name": st.column_config.TextColumn("name", pinned=True),
        "dictionary": st.column_config.TextColumn("dictionary", help="architecture · width (latents) · k"),
        "analysed": st.column_config.TextColumn("analysed", width="small"),
    })
    with st.expander("More columns: id, hook, architecture, status, explained variance, training tokens"):
        st.table(details)
    st.caption("Metrics are measured on the held-out 5 % of the cache; CE loss recovered and KL need the model "
               "(absent when trained with `--no-downstream`).")
    browsable = [s["name"] for s in info["saes"] if s["status"] == "done" and info["analysed"].get(s["sae_id"]) == "done"]
    if browsable:
        st.markdown("**Browse features**")
        for name in browsable:
            st.page_link("pages/1_Feature.py", label=f"{name}: feature 0",
                         query_params={"sae": name, "feature": "0"})
    pending = [s["name"] for s in info["saes"] if s["status"] == "done" and info["analysed"].get(s["sae_id"]) != "done"]
    for name in pending:
        st.caption(f"`{name}` is not analysed yet: run `workbench analyze --db {path} --sae {name}` to browse its features.")
