"""Feature page: one latent of one SAE. Links: ?sae=NAME&feature=ID (the URL follows the sidebar)."""

import streamlit as st

from workbench.app import cached, render

st.set_page_config(page_title="Feature", page_icon="🔬", layout="wide")
FEATURE_PAGE = "pages/1_Feature.py"
STEERING_PAGE = "pages/4_Steering.py"

path = cached.workspace_path()
names = cached.sae_names_or_stop(path, "train one with `workbench train`, then `workbench analyze`", title="Feature")

state = st.session_state

# -- the URL wins when it changed (first load, a link); afterwards the sidebar drives the URL ----
url = (st.query_params.get("sae"), st.query_params.get("feature"))
url_problem = False
if state.get("_feature_url") != url:
    state["_feature_url"] = url
    sae_ref, feature_ref = url
    if sae_ref is not None:
        record = cached.call(cached.resolve, path, sae_ref, stop=False)
        state["sae"] = record.name if record is not None else None
        url_problem |= record is None
    if feature_ref is not None:
        try:
            state["feature"] = int(feature_ref)
        except ValueError:
            st.error(f"feature id in the URL must be a whole number, got '{feature_ref}'")
            url_problem = True
if "sae" not in state or (state["sae"] is not None and state["sae"] not in names):
    state["sae"] = state.get("_last_sae") if state.get("_last_sae") in names else names[0]
if "feature" not in state:
    state["feature"] = state.get("_last_feature", 0)
widths = {s["name"]: s["width"] for s in cached.call(cached.overview, path)["saes"]}


def _clamp_feature() -> None:
    """The sidebar's − and + stop at the first and last feature instead of stepping out of range."""
    width = widths.get(state.get("sae"))
    if width:
        state["feature"] = min(max(int(state["feature"]), 0), width - 1)


def _jump_to_id() -> None:
    """Search by feature id: Enter in the search box moves the sidebar's feature id."""
    text = state.get("search_text", "").strip()
    state["_search_error"] = None
    if state.get("search_mode") == "feature id" and text:
        try:
            state["feature"] = int(text)
        except ValueError:
            state["_search_error"] = f"feature id must be a whole number, got '{text}'"


with st.sidebar:
    sae = st.selectbox("SAE", names, key="sae", placeholder="choose an SAE")
    feature_id = st.number_input("Feature id", key="feature", step=1, format="%d", on_change=_clamp_feature,
                                 help=f"0..{widths[sae] - 1}" if sae in widths else None)
if url_problem or sae is None:
    if sae is None:
        st.info("Choose an SAE in the sidebar.")
    st.stop()
feature_id = int(feature_id)
state["_last_sae"], state["_last_feature"] = sae, feature_id
# Written on every run: a page_link to this same page changes the page's query string on the
# server but leaves the browser's address bar as it was until the script sets it.
st.query_params.update(sae=sae, feature=str(feature_id))
state["_feature_url"] = (sae, str(feature_id))

labels = cached.label_map(path, sae)
st.title(f"Feature {feature_id}")
if feature_id in labels:
    label, score, explainer = labels[feature_id]
    st.markdown(f'<div class="wb-label" style="font-size:1.25rem;font-weight:600">{render.escape(label)}</div>',
                unsafe_allow_html=True)
    st.caption(f"label by `{explainer}`" + (f" · score {score:.2f}" if score is not None else ""))
st.caption(f"SAE `{sae}` · link: `?sae={sae}&feature={feature_id}`")

# -- search --------------------------------------------------------------------------------------
SEARCH_MODES = ["token regex", "label text", "feature id"]
PLACEHOLDERS = {"token regex": "regular expression over token strings, e.g. ^ the$", "label text": "words of a label, e.g. python",
                "feature id": "feature id, then Enter"}


def show_results(found: list[tuple[int, str]], query: str) -> None:
    """Search results: a link named by id and label, the numbers, and a one-line preview of the strongest example.
    They collapse once one of them is opened (the feature shown is no longer the one the search started from)."""
    key = (mode, query)
    if state.get("_search_key") != key:
        state["_search_key"], state["_search_from"] = key, feature_id
    opened = state.get("_search_from") != feature_id
    title = f"{len(found)} result{'s' if len(found) != 1 else ''} for '{query}'" + (" (opened one)" if opened else "")
    shown = cached.call(cached.previews, path, sae, tuple(f for f, _ in found), stop=False) or {}
    with st.expander(title, expanded=not opened):
        for f, numbers in found:
            link, detail = st.columns([2, 5])
            with link:
                st.page_link(FEATURE_PAGE, label=cached.feature_name(f, labels), query_params={"sae": sae, "feature": str(f)})
            detail.caption(numbers)
            if f in shown:
                detail.markdown(render.preview_html(shown[f]), unsafe_allow_html=True)


with st.container(border=True):
    mode_col, text_col = st.columns([1, 2])
    mode = mode_col.radio("Search by", SEARCH_MODES, key="search_mode", horizontal=True)
    query = text_col.text_input("Search", key="search_text", on_change=_jump_to_id, placeholder=PLACEHOLDERS[mode])
    if state.get("_search_error") and mode == "feature id":
        st.error(state["_search_error"])
    if mode == "token regex" and query:
        results = cached.call(cached.search, path, sae, query, stop=False)
        if results == []:
            st.info(f"No feature fires on a token matching '{query}'.")
        if results:
            show_results([(r["feature"], f"F1 {r['f1']:.3f} · precision {r['precision']:.3f} · recall {r['recall']:.3f} "
                                         f"· fired on {r['n_fired']:,} tokens") for r in results], query)
    if mode == "label text" and query:
        if not labels:
            st.info(f"No feature labels stored for `{sae}`: `workbench explain --db {path} --sae {sae}` writes them.")
        else:
            hits = cached.call(cached.label_search, path, sae, query.strip(), 20, stop=False)
            if hits == []:
                st.info(f"No label contains '{query.strip()}'.")
            if hits:
                show_results([(f, "label score " + (f"{score:.2f}" if score is not None else "–")) for f, _, score in hits],
                             query)

# -- the feature ---------------------------------------------------------------------------------
view = cached.call(cached.feature, path, sae, feature_id)
st.page_link(STEERING_PAGE, label="Steer with this", icon="🧭", query_params={"sae": sae, "feature": str(feature_id)},
             help="open the Steering page with this feature selected")
summary = view["summary"]
vmax = summary["max"] or 0.0

density, fired, mean, peak = st.columns(4)
density.metric("Density", f"{summary['density']:.3%}", help="fraction of analysed tokens where it fires (value > 0)")
fired.metric("Tokens fired", f"{summary['n_fired']:,}")
mean.metric("Mean activation", f"{summary['mean']:.3f}" if summary["n_fired"] else "–")
peak.metric("Max activation", f"{vmax:.3f}" if summary["n_fired"] else "–")
if not summary["n_fired"]:
    st.info("This feature never fires on the analysed tokens (a dead latent).")

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(render.activation_histogram(summary), key="histogram")
with right:
    st.markdown("**Logit effects** (direct: decoder direction · final norm · unembedding)")
    promoted, suppressed = view["logits"]["promoted"], view["logits"]["suppressed"]
    if promoted or suppressed:
        up, down = st.columns(2)
        up.dataframe([{"promoted": render.visible(t), "effect": round(e, 4)} for t, e in promoted], hide_index=True)
        down.dataframe([{"suppressed": render.visible(t), "effect": round(e, 4)} for t, e in suppressed], hide_index=True)
    else:
        st.caption("No logit effects stored (analysed with `--no-logits`).")

st.subheader("Top activations")
if view["top"]:
    st.markdown(render.legend_html(vmax), unsafe_allow_html=True)
    st.markdown(render.examples_html(view["top"], vmax), unsafe_allow_html=True)
else:
    st.caption("No examples.")

st.subheader("Quantile bands")
st.caption("Activations cut into equal bands of (0, max]; a few tokens sampled from each.")
bands = [(b, ex) for b, ex in view["bands"].items() if ex]
n_bands = len(view["bands"])
empty = sorted((b + 1 for b, ex in view["bands"].items() if not ex), reverse=True)
if empty:  # a window is shown once per page: a band whose windows are all among the top examples stays empty
    st.caption(f"No further windows in band{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of {n_bands}: "
               "their tokens fired in windows shown above, or not at all.")
for i, (b, ex) in enumerate(bands):
    low, high = vmax * b / n_bands, vmax * (b + 1) / n_bands
    with st.expander(f"band {b + 1} of {n_bands}: ({low:.3f}, {high:.3f}] · {len(ex)} examples", expanded=i == 0):
        st.markdown(render.examples_html(ex, vmax), unsafe_allow_html=True)

st.subheader("Related features")
st.caption("Nearest decoder directions (cosine) with co-occurrence (Jaccard of the tokens where both fire).")
if not view["related"]:
    st.caption("None stored.")
for r in view["related"]:
    link, numbers = st.columns([1, 4])
    with link:
        st.page_link(FEATURE_PAGE, label=cached.feature_name(r["feature"], labels),
                     query_params={"sae": sae, "feature": str(r["feature"])})
    numbers.caption(f"cosine {r['cosine']:.3f} · co-occurrence {r['cooccurrence']:.3f} · density {r['density']:.3%}")
