"""Features page: every feature of one SAE as a sortable, filterable table and a 2-D map of its decoder directions.

Links: ?sae=NAME (or the SAE id). A click on a table row or a map point opens that feature's page; "Random live
feature" opens one that fired, at random. Labels appear when the workspace has them (``cached.labels``).
"""

import random

import streamlit as st

from workbench.app import cached, render
from workbench.app import features_view as view

st.set_page_config(page_title="Features", page_icon="🗺️", layout="wide")
st.title("Features")
FEATURE_PAGE = "pages/1_Feature.py"

path = cached.workspace_path()
names = cached.sae_names_or_stop(path, "train one with `workbench train`, then `workbench analyze`")

state = st.session_state
wanted = st.query_params.get("sae")
if wanted is not None and state.get("_features_url") != wanted:
    state["_features_url"] = wanted
    state["features_sae"] = cached.call(cached.resolve, path, wanted).name  # an unknown SAE: one error line
if state.get("features_sae") not in names:
    state["features_sae"] = names[0]
sae = st.selectbox("SAE", names, key="features_sae")
st.query_params["sae"] = sae
state["_features_url"] = sae


def open_feature(feature: int) -> None:
    st.switch_page(FEATURE_PAGE, query_params={"sae": sae, "feature": str(int(feature))})


table = cached.call(cached.feature_table, path, sae)
labels = cached.label_map(path, sae)
all_rows = view.rows(table, labels)
live = [r["feature"] for r in all_rows if r["fired"] > 0]

summary_col, random_col = st.columns([4, 1])
summary_col.caption(f"SAE `{sae}` · {len(all_rows):,} features · {len(live):,} fired on the analysed tokens"
                    + (f" · {len(labels):,} labelled" if labels else " · no labels stored"))
if random_col.button("🎲 Random live feature", key="features_random", disabled=not live,
                     help="open the page of a feature that fired, chosen at random"):
    open_feature(random.choice(live))

# -- the table ------------------------------------------------------------------------------------
with st.container(border=True):
    text_col, domain_col, sort_col = st.columns([2, 1, 1])
    text = text_col.text_input("Filter", key="features_filter", placeholder="part of a label, or a feature id")
    domains = sorted({r["dominant domain"] for r in all_rows if r["dominant domain"]})
    domain = domain_col.selectbox("Dominant domain", ["any", *domains], key="features_domain")
    sort = sort_col.selectbox("Sort by", list(view.SORTS), key="features_sort")
    bounds = view.log_density_bounds(table)
    density_col, live_col, labelled_col = st.columns([2, 1, 1])
    log_density = None
    if bounds is not None and bounds[0] < bounds[1]:
        log_density = density_col.slider("log10 density", bounds[0], bounds[1], bounds, 0.1, key=f"features_density_{sae}",
                                         help="features that fired on this fraction of the analysed tokens")
    live_only = live_col.checkbox("Only features that fired", key="features_live")
    labelled_only = labelled_col.checkbox("Only labelled features", key="features_labelled", disabled=not labels)

shown = view.sorted_rows(view.filtered(all_rows, text=text, domain=None if domain == "any" else domain, live_only=live_only,
                                       log_density=log_density, labelled_only=labelled_only), sort)
st.caption(f"{len(shown):,} of {len(all_rows):,} features · click a row to open its page; click a column title to sort by it")
picked = st.dataframe(
    shown, hide_index=True, key="features_table", on_select="rerun", selection_mode="single-row",
    column_order=[c for c in ("feature", "label", "score", "density", "fired", "max activation", "mean activation",
                              "dominant domain", "domain share") if labels or c not in ("label", "score")],
    column_config={
        "feature": st.column_config.NumberColumn("feature", format="%d", width="small"),
        "label": st.column_config.TextColumn("label", width="large"),
        "score": st.column_config.NumberColumn("score", format="%.2f", width="small", help="the explainer's score of the label"),
        "density": st.column_config.NumberColumn("density", format="%.3e", help="fraction of analysed tokens where it fires"),
        "fired": st.column_config.NumberColumn("tokens fired", format="%d"),
        "max activation": st.column_config.NumberColumn("max activation", format="%.3f"),
        "mean activation": st.column_config.NumberColumn("mean activation", format="%.3f"),
        "dominant domain": st.column_config.TextColumn("dominant domain", help="corpus domain of most of its firings"),
        "domain share": st.column_config.ProgressColumn("share", format="percent", min_value=0.0, max_value=1.0,
                                                        help="fraction of its firings in the dominant domain"),
    },
)
chosen = view.selected_row(picked, shown)
if chosen is not None:
    open_feature(chosen)

# -- the map --------------------------------------------------------------------------------------
st.subheader("Map of decoder directions")
layout = cached.call(cached.feature_map, path, sae, cached.MAP_LIMIT, stop=False)
if layout is not None:
    colour = st.radio("Colour by", ["log10 density", "dominant domain"], key="features_colour", horizontal=True)
    fig, traces = render.feature_map_figure(layout, table, labels, "domain" if colour == "dominant domain" else "density")
    sampled = len(layout["features"]) < layout["width"]
    st.caption(f"Each point is one feature's unit decoder direction, placed by {layout['method']} (cosine): nearby points "
               "write similar directions. Hover for the id and label; click a point to open its page."
               + (f" A seeded sample of {len(layout['features']):,} of the {layout['width']:,} features is drawn." if sampled else ""))
    event = st.plotly_chart(fig, key="features_map", on_select="rerun", selection_mode="points")
    chosen = view.selected_feature(event, traces)
    if chosen is not None:
        open_feature(chosen)
