"""Compare SAEs trained on one hook: L0 against FVU, dead and dense latents, feature densities."""

import streamlit as st

from workbench.app import cached, render

st.set_page_config(page_title="Compare SAEs", page_icon="📈", layout="wide")
st.title("Compare SAEs")

path = cached.workspace_path()
info = cached.call(cached.overview, path)
done = [s for s in info["saes"] if s["status"] == "done"]
if not done:
    st.info("No trained SAE in this workspace yet: train some with `workbench train` to compare them.")
    st.stop()

hooks = sorted({s["hook"] for s in done})
hook = st.selectbox("Hook", hooks, help="SAEs are comparable only on the same activations")
rows = []
for s in done:
    if s["hook"] == hook:
        m = s["metrics"]
        rows.append({"name": s["name"], "arch": s["arch"], "width": s["width"], "k": s["k"],
                     "l0": m.get("l0"), "fvu": m.get("fvu"), "dead_fraction": m.get("dead_fraction"),
                     "dense_fraction_1pct": m.get("dense_fraction_1pct"), "dense_fraction_10pct": m.get("dense_fraction_10pct"),
                     "ce_loss_recovered": m.get("ce_loss_recovered")})
st.dataframe(rows, hide_index=True)

measured = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]
left, right = st.columns(2)
with left:
    st.plotly_chart(render.frontier_figure(measured), key="frontier")
with right:
    st.plotly_chart(render.fractions_figure(rows), key="fractions")

densities = cached.call(cached.densities, path)
analysed = {r["name"]: densities[r["name"]] for r in rows if densities.get(r["name"])}
if analysed:
    st.plotly_chart(render.density_figure(analysed), key="densities")
    never = ", ".join(f"{name}: {sum(d == 0 for d in values)}" for name, values in analysed.items())
    st.caption(f"Latents that never fired on the analysed tokens (not on the log scale): {never}.")
missing = [r["name"] for r in rows if r["name"] not in analysed]
if missing:
    st.caption("Not analysed yet (no densities): " + ", ".join(f"`{n}`" for n in missing)
               + " — run `workbench analyze --db W --sae NAME`.")
