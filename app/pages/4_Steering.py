"""Steering page: steer the model with SAE features (or codebook codes) and compare continuations.

Links: ?sae=NAME&feature=ID[,ID...] (the Feature page's "steer with this"). The page only collects a
``SteeringSpec``; generation (``steering.generate``, baseline and steered with the same seed) and the
strength sweep (``steering.sweep``) run in the library, each on a button press. "Save spec" writes
the spec only as ``<workspace>.specs/NAME.json`` (``steering.store.save_named``: a checked name, never a
path; an existing spec is kept unless "Overwrite" is ticked).
"""

import math
import shlex

import streamlit as st

from workbench.app import cached, render
from workbench.safety import NAME_CHARS
from workbench.steering import CODE_MODES, UNITS, Intervention, SteeringSpec, default_unit, parse_indices, parse_strengths
from workbench.steering.store import save_named, spec_folder

st.set_page_config(page_title="Steering", page_icon="🧭", layout="wide")
st.title("Steering")
FEATURE_PAGE = "pages/1_Feature.py"
DEFAULT_PROMPT = "The most important thing to remember is"
MAX_FEATURES = 8

path = cached.workspace_path()
names = cached.sae_names_or_stop(path, "train one with `workbench train`")

state = st.session_state
# A run stopped early (an invalid Features entry, a bad spec) does not draw the strengths, the prompt or the
# temperature, so the browser drops those widgets and draws them at their defaults on the next run, although the
# server still holds their values. After such a run every kept value is written back through the session state,
# which sends it to the browser with the widget again. ``_steer_finished`` is set at the very end of the page.
BUTTONS = {"steer_generate", "steer_sweep", "steer_save", "steer_download"}  # their values cannot be written
if state.get("_steer_finished") is False:
    for kept in [k for k in state if isinstance(k, str) and k.startswith("steer_") and k not in BUTTONS]:
        state[kept] = state[kept]
state["_steer_finished"] = False

# -- the URL sets the SAE and features when it changed (first load, a "steer with this" link) -----
url = (st.query_params.get("sae"), st.query_params.get("feature"))
if state.get("_steer_url") != url:
    sae_ref, feature_ref = url
    if sae_ref is not None:
        state["steer_sae"] = cached.call(cached.resolve, path, sae_ref).name  # unknown SAE: one error line
    if feature_ref is not None:
        state["steer_features"] = ", ".join(feature_ref.replace(",", " ").split())
    state["_steer_url"] = url
if state.get("steer_sae") not in names:
    state["steer_sae"] = names[0]
if "steer_features" not in state:
    state["steer_features"] = "0"

sae = st.selectbox("SAE", names, key="steer_sae")
record = cached.call(cached.resolve, path, sae)
model_name = cached.call(cached.model_name, path, record.run_id)
st.caption(f"model `{model_name}` · hook `{record.hook}` · {record.arch}, {record.width} latents")
text = st.text_input("Features", key="steer_features", help=f"ids separated by commas (0..{record.width - 1}), at most {MAX_FEATURES}")
ids = cached.call(parse_indices, text)
if not ids:
    st.info("Give one or more feature ids to steer with.")
    st.stop()
if len(ids) > MAX_FEATURES:
    st.error(f"at most {MAX_FEATURES} features at once, got {len(ids)}")
    st.stop()
cached.call(cached.check_steering, path, SteeringSpec(tuple(Intervention(source=sae, index=i, unit="raw") for i in ids)).to_json())
scales = cached.call(cached.feature_scales, path, sae)
labels = cached.label_map(path, sae)


def strength_slider(column, i: int, method: str, unit: str) -> float:
    """A slider whose range and default suit the method and unit; the caption says what one unit is."""
    p99, vmax = scales["feature_p99"][i], scales["feature_max"][i]
    where = "the analysis" if scales["source"] == "store" else "the cached activations"
    if method == "code":
        lo, hi, step, value = 0.0, 5.0, 0.25, 1.0
        note = "weight of the forced code (1: as the codebook weights a selected code)"
    elif unit == "raw" and method == "add":
        lo, hi, step, value = -50.0, 50.0, 0.5, 8.0
        note = "strength × the unit-norm decoder direction (the added vector's norm)"
    elif unit == "raw":
        hi = float(max(1, math.ceil(4 * vmax)))
        lo, step, value = 0.0, 0.01 if hi <= 5 else 0.1, round(min(hi, 2 * p99) if p99 > 0 else 1.0, 2)
        note = f"the latent value z_{i} is set to the strength (its p99 is {p99:.3f}, max {vmax:.3f})"
    else:
        sigma = scales[unit][i]
        lo, hi, step, value = (-10.0, 10.0, 0.25, 4.0) if method == "add" else (0.0, 10.0, 0.25, 2.0)
        what = "the decoder vector × σ" if method == "add" else f"z_{i} := strength × σ"
        note = f"1 unit = σ = {sigma:.3f}, the feature's {unit.removeprefix('feature_')} activation over {where} ({what})"
    strength = column.slider(f"strength ({unit})", lo, hi, value, step, key=f"steer_strength_{i}_{method}_{unit}")
    column.caption(note)
    return strength


# -- one row of controls per feature ---------------------------------------------------------------
methods = ["code", "add", "clamp", "ablate"] if record.arch == "codebook" else ["add", "clamp", "ablate"]
interventions = []
for i in ids:
    with st.container(border=True):
        name_col, method_col, unit_col, strength_col = st.columns([1, 1, 1, 3])
        with name_col:
            st.markdown(f"**{'code' if record.arch == 'codebook' else 'feature'} {i}**")
            if i in labels:
                st.caption(render.escape(render.short(labels[i][0], 60)))
            st.page_link(FEATURE_PAGE, label="open feature", query_params={"sae": sae, "feature": str(i)})
        method = method_col.selectbox("method", methods, key=f"steer_method_{i}")
        unit, strength, mode = "raw", 0.0, None
        if method == "ablate":
            strength_col.caption("clamps the feature to 0; what the SAE does not explain (x − x̂) passes unchanged")
        else:
            units = ["raw"] if method == "code" else list(UNITS)
            unit = unit_col.selectbox("unit", units, index=units.index(default_unit(method)), key=f"steer_unit_{i}_{method}")
            strength = strength_slider(strength_col, i, method, unit)
        if method == "code":
            mode = method_col.selectbox("code mode", CODE_MODES, key=f"steer_code_mode_{i}",
                                        help="replace_lowest: swap out the lowest-scoring selected code; replace_all: only this code")
        interventions.append(cached.call(Intervention, source=sae, index=i, method=method, strength=strength, unit=unit, code_mode=mode))
spec = SteeringSpec(tuple(interventions))
spec_json = spec.to_json()

# -- generation -------------------------------------------------------------------------------------
prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, height=80, key="steer_prompt")
tokens_col, temperature_col, seed_col = st.columns(3)
new_tokens = tokens_col.number_input("New tokens", min_value=1, max_value=128, value=24, step=1, key="steer_new_tokens")
temperature = temperature_col.slider("Temperature (0: greedy)", 0.0, 1.5, 0.7, 0.05, key="steer_temperature")
seed = seed_col.number_input("Seed (the same for both)", min_value=0, value=0, step=1, key="steer_seed")
inputs = (sae, spec_json, prompt, int(new_tokens), float(temperature), int(seed))
if st.button("Generate", key="steer_generate", type="primary"):
    result = cached.call(cached.steer_generate, path, model_name, spec_json, prompt, new_tokens, seed, temperature, stop=False)
    state["_steer_generation"] = (inputs, result) if result is not None else None
shown = state.get("_steer_generation")
if shown:
    shown_inputs, gen = shown
    baseline_col, steered_col = st.columns(2)
    with baseline_col:
        st.markdown("**Baseline**")
        st.markdown(render.continuation_html(gen["prompt"], gen["baseline"]), unsafe_allow_html=True)
    with steered_col:
        st.markdown("**Steered**")
        st.markdown(render.continuation_html(gen["prompt"], gen["steered"]), unsafe_allow_html=True)
    sampling = "greedy" if shown_inputs[4] == 0 else f"temperature {shown_inputs[4]:g}, seed {shown_inputs[5]}"
    st.caption(f"{len(gen['baseline_tokens'])} / {len(gen['steered_tokens'])} new tokens, {sampling}"
               + ("" if shown_inputs == inputs else " · the settings changed since: press Generate again"))

# -- strength sweep ---------------------------------------------------------------------------------
st.subheader("Strength sweep")
st.caption("Every intervention takes each strength in its own unit (ablate stays at 0). Δ log P: the change of "
           "log P(the feature's 10 top logit-effect tokens) on the prompt, teacher-forced; KL(baseline ‖ steered) "
           "on built-in neutral sentences: the side-effect cost.")
strengths_col, neutral_col = st.columns([2, 1])
strengths_text = strengths_col.text_input("Strengths", value="0, 1, 2, 4", key="steer_strengths")
n_neutral = neutral_col.slider("Neutral sentences", 1, 4, 2, key="steer_neutral")
if st.button("Run sweep", key="steer_sweep"):
    strengths = cached.call(parse_strengths, strengths_text, stop=False)
    rows = None
    if strengths is not None:
        rows = cached.call(cached.steer_sweep, path, model_name, spec_json, strengths, prompt, n_neutral, stop=False)
    state["_steer_sweep"] = rows
if state.get("_steer_sweep"):
    rows = state["_steer_sweep"]
    units = sorted({iv["unit"] for iv in rows[0]["interventions"]})
    st.plotly_chart(render.sweep_figure(rows, f"strength ({', '.join(units)})"), key="steer_sweep_chart")
    table = []
    for r in rows:
        row = {"strength": r["strength"], "KL neutral": round(r["kl_neutral"], 5), "JS neutral": round(r["js_neutral"], 5)}
        for iv in r["interventions"]:
            row[f"Δ log P · {iv['index']}"] = round(iv["delta_logprob_top"], 4)
            row[f"activation · {iv['index']}"] = round(iv["feature_act_steered"], 3)
        table.append(row)
    st.dataframe(table, hide_index=True)

# -- the spec ---------------------------------------------------------------------------------------
# The page writes nowhere but the workspace's specs folder (workbench.steering.store): a name, never a path.
st.subheader("Spec")
specs = spec_folder(path)
st.caption(f"Save it under a name into `{specs}` (this workspace's specs folder), then run it again with "
           f"`workbench steer --db {path} --spec {specs}/NAME.json --prompt ...`.")
st.code(spec_json, language="json")
download_col, name_col, overwrite_col, save_col = st.columns([1, 2, 1, 1])
download_col.download_button("Download spec", spec_json + "\n", file_name="steering_spec.json", mime="application/json",
                             key="steer_download")
spec_name = name_col.text_input("Spec name", key="steer_spec_name", placeholder="name, e.g. feature-12-add-4",
                                label_visibility="collapsed",  # no max_chars: Streamlit would cut a long name silently
                                help=f"saved as {specs}/NAME.json; NAME: {NAME_CHARS}")
overwrite = overwrite_col.checkbox("Overwrite", key="steer_spec_overwrite", value=False,
                                   help="replace a saved spec of the same name (otherwise an existing one is kept)")
if save_col.button("Save spec", key="steer_save"):
    written = cached.call(save_named, spec, path, spec_name.strip(), overwrite=overwrite, stop=False)
    if written is not None:
        st.success(f"Saved `{written}`. Reuse it with "
                   f"`workbench steer --db {shlex.quote(path)} --spec {shlex.quote(str(written))} --prompt ...`")
state["_steer_finished"] = True
