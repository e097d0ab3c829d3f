"""Sparsity: activation ratio of MLP neurons per layer, the PPL–sparsity trade-off, and law fits."""

import shlex

import streamlit as st

from workbench.app import cached
from workbench.app import sparsity_view as view

st.set_page_config(page_title="Sparsity", page_icon="🕳️", layout="wide")
st.title("Activation sparsity")

path = cached.workspace_path()
data = cached.call(view.sparsity, path)
if not data["measurements"]:
    runs = cached.call(cached.overview, path)["runs"]
    model = runs[0]["model"] if runs else "smollm2-135m"
    db = shlex.quote(path)
    st.info(f"No sparsity measurements in this workspace yet. Measure `{model}` at PPL-1% with\n\n"
            f"`workbench sparsity measure --db {db} --model {shlex.quote(model)}`\n\n"
            "(16,384 held-out tokens: roughly 2–10 minutes on a CPU for a 135 M-parameter model, much less for tiny-llama; "
            "`--tokens 4096` is quicker), or train small ReLU/SiLU models and fit the laws over their checkpoints with\n\n"
            f"`workbench sparsity series --db {db}`\n\n(about 3–4 minutes on a CPU for each model it trains).")
    st.stop()

rows = data["measurements"]
st.caption("Activation ratio = fraction of MLP neurons kept per token, averaged over tokens and layers. "
           "PPL-p%: the most truncation whose perplexity stays within p% of the dense model's "
           "(cett, topk, fat); zero: exact zeros in the dense model.")

# -- one model (or checkpoint) ------------------------------------------------------------------
def subject(row: dict) -> str:
    return f"{row['series']} @ {row['train_tokens']:,} tokens" if row["series"] else row["model"]


subjects = list(dict.fromkeys(subject(r) for r in rows))
chosen = st.selectbox("Model or checkpoint", subjects)
mine = [r for r in rows if subject(r) == chosen]
first = mine[0]
st.caption(f"{first['activation']} MLP · {first['n_layers']} layers · d_model {first['d_model']} · d_mlp {first['d_mlp']} · "
           f"{first['eval_tokens']:,} held-out tokens of `{first['corpus']}` · dense PPL {first['ppl_dense']:.3f}")
st.dataframe([{"metric": r["label"], "activation ratio": round(r["activation_ratio"], 4),
               "sparsity": round(1 - r["activation_ratio"], 4), "PPL": round(r["ppl"], 3),
               "knob": None if r["knob"] is None else round(r["knob"], 4)} for r in mine], hide_index=True)
left, right = st.columns(2)
with left:
    st.plotly_chart(view.layer_figure(mine, data["layers"]), key="layers")
with right:
    searched = [r for r in mine if data["curves"][r["measurement_id"]]]
    if searched:
        st.plotly_chart(view.tradeoff_figure(searched, data["curves"]), key="tradeoff")

# -- laws over a training series ----------------------------------------------------------------
series_names = sorted({r["series"] for r in rows if r["series"]})
if not series_names:
    st.info(f"No training series yet: `workbench sparsity series --db {shlex.quote(path)}` trains small ReLU and SiLU "
            "models and fits the laws over their checkpoints (about 3–4 minutes per model on a CPU).")
    st.stop()

st.header("Laws over training")
labels = sorted({r["label"] for r in rows if r["series"]})
label = st.selectbox("Metric", labels, index=labels.index("cett@PPL-1%") if "cett@PPL-1%" in labels else 0)
fits_by_key = {(s, lab): [] for s, lab, _ in data["fits"]}
for s, lab, fit in data["fits"]:
    fits_by_key[(s, lab)].append(fit)
columns = st.columns(2)
for i, name in enumerate(series_names):
    points = sorted((r["train_tokens"], r["activation_ratio"]) for r in rows if r["series"] == name and r["label"] == label)
    fits = [f for f in fits_by_key.get((name, label), []) if f["law"] != "width_depth"]
    with columns[i % 2]:
        st.plotly_chart(view.law_figure(points, fits, f"{name}: {label}"), key=f"law-{name}")
table = [{"series": s, "metric": lab, "law": f["law"], "R²": round(f["r2"], 4), "checkpoints": f["n_points"],
          **{k: f"{v:.4g} ± {f['stderr'][k]:.2g}" if f["stderr"][k] is not None else f"{v:.4g}" for k, v in f["params"].items()}}
         for s, lab, f in data["fits"]]
if table:
    st.dataframe(table, hide_index=True)

shapes = {}
for r in rows:
    if r["series"] and r["label"] == label:
        last = shapes.get(r["series"])
        if last is None or r["train_tokens"] > last["train_tokens"]:
            shapes[r["series"]] = r
if len({(r["d_model"], r["n_layers"]) for r in shapes.values()}) > 1:
    points = [(r["d_model"] / r["n_layers"], r["activation_ratio"], s) for s, r in sorted(shapes.items())]
    wd_fit = next((f for s, lab, f in data["fits"] if f["law"] == "width_depth" and lab == label), None)
    st.plotly_chart(view.width_depth_figure(points, wd_fit), key="width-depth")
