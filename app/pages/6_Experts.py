"""Experts: MoE / MoEfied expert specialisation next to SAE latents and MLP neurons; sparse probing."""

import shlex

import streamlit as st

from probes.unit_kinds import KIND_LABELS
from workbench.app import cached
from workbench.app import experts_data as reads
from workbench.app import experts_figures as figures
from workbench.app import experts_view as view

st.set_page_config(page_title="Experts", page_icon="🧩", layout="wide")
st.title("Experts")

path = cached.workspace_path()
data = cached.call(reads.experts, path)
if not data["runs"] and not data["probes"]:
    db = shlex.quote(path)
    done = [s["name"] for s in cached.call(cached.overview, path)["saes"] if s["status"] == "done"]
    if done:
        sae = shlex.quote(done[0])
        st.info(f"No expert or probing results in this workspace yet. Run\n\n`workbench moe run --db {db} --sae {sae}`\n\n"
                f"(MoEfies the MLP of `{done[0]}`'s model at its layer and compares experts, SAE latents and neurons: "
                "roughly 2–10 minutes on a CPU for a 135 M-parameter model with the default 512 evaluation tokens per domain) "
                f"and\n\n`workbench probe --db {db} --sae {sae}`\n\n(sparse probing on the corpus domains: a few minutes).")
    else:
        st.info(f"No expert or probing results in this workspace yet, and no trained SAE to compare with. Train one with "
                f"`workbench train --db {db} ...`, then run `workbench moe run --db {db} --sae SAE` (MoEfication: roughly "
                f"2–10 minutes on a CPU) and `workbench probe --db {db} --sae SAE` (sparse probing: a few minutes).")
    st.stop()


def label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def moe_run(run: dict) -> None:
    rid = run["moe_run_id"]
    router = run["source"] == "router"
    st.caption(f"`{run['corpus']}` · {run['eval_tokens']:,} evaluation tokens over {', '.join(run['domains'])} · "
               f"{run['balance']} · {run['architecture']}")
    for notice in run["notices"]:
        st.caption(f"ℹ️ {notice}")

    if run["curve"]:
        st.plotly_chart(figures.curve_figure(run["curve"], run["n_experts"], run["source"], run["k"]), key=f"curve-{rid}")
        if router:
            st.caption(f"Every MoE layer re-routed top-k by the model's own rule; k = {run['k']} is the model itself.")

    # -- experts vs latents vs neurons ------------------------------------------------------------
    st.header("Experts vs latents vs neurons")
    grouping = st.radio("Group tokens by", ["domain", "concept"], horizontal=True, key=f"grouping-{rid}")
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
             for r in run["comparison"] if r["grouping"] == grouping]
    st.dataframe(table, hide_index=True)
    st.caption("Means over live experts. Specialised: mass on one group ≥ 2× the runner-up (Monet). Entropy of p(e|group) "
               "normalised by log E (1 = uniform). Purity max p(group|e) with every group weighted equally. MI in nats and "
               "normalised by min(H(E), H(group)).")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(figures.comparison_figure(run["comparison"], grouping), key=f"comparison-{rid}-{grouping}")
    with right:
        st.plotly_chart(figures.shares_figure(run["groups"], grouping), key=f"shares-{rid}-{grouping}")

    st.header("Expert × group heatmap")
    units = list(dict.fromkeys((r["kind"], r["layer"]) for r in run["comparison"]))
    labels = {f"{label(kind)}, layer {layer}": (kind, layer) for kind, layer in units}
    kind, layer = labels[st.selectbox("Experts", list(labels), key=f"heatmap-units-{rid}")]
    stored = cached.call(reads.mass, path, rid, layer, kind, grouping)
    fig, shown = figures.heatmap_figure(stored["mass"], stored["experts"], f"p({grouping} | expert): {label(kind)}")
    st.plotly_chart(fig, key=f"heatmap-{rid}")
    total = len(stored["experts"])
    if shown < total:
        st.caption(f"Showing the {shown} purest of {total} experts.")

    # -- masking selectivity ----------------------------------------------------------------------
    if run["selectivity"]:
        st.header("Masking selectivity")
        groupings, budgets = reads.selection_pairs(run["selectivity"])
        left, right = st.columns(2)
        with left:
            targets = st.radio("Targets and measured groups", groupings, horizontal=True, key=f"sel-grouping-{rid}")
        with right:
            budget = st.radio("Budget", budgets, horizontal=True, key=f"sel-budget-{rid}")
        st.caption("Each row removes units chosen for one target (on separate fit tokens) in every studied layer and "
                   f"measures the change of next-token loss on every {targets}, against the kind's own baseline; "
                   "selectivity = ΔTarget − mean ΔOthers.")
        st.caption(reads.budget_caption(budget, run["config"]))
        rows = [r for r in run["selectivity"] if (r["grouping"], r["budget"]) == (targets, budget)]
        kinds = list(dict.fromkeys(r["kind"] for r in rows))
        if not kinds:
            st.info(f"No masking by {targets} with the {budget} budget in this run.")
        else:
            columns = st.columns(min(len(kinds), 2))
            for i, kind in enumerate(kinds):
                with columns[i % len(columns)]:
                    st.plotly_chart(figures.selectivity_figure(rows, kind, targets, budget),
                                    key=f"selectivity-{rid}-{kind}-{targets}-{budget}")
            st.dataframe(reads.selectivity_table(rows, reads.units_per_kind(run["comparison"]), targets, budget),
                         hide_index=True)

    # -- concept purge ----------------------------------------------------------------------------
    st.header("Concept purge")
    concepts = reads.purge_concepts(run["purge"])
    if not concepts:
        st.info("No concept purge in this run (runs stored before the purge was measured have none): rerun "
                "`workbench moe run` to measure it.")
    else:
        st.caption("Monet's purge: for each threshold τ, remove every unit whose correlation ρ with the concept (on the "
                   "fit tokens) exceeds τ, in every studied layer, and measure the next-token loss on the tokens that "
                   "satisfy the concept (solid) and on the rest (dashed), each against the kind's baseline. A selective "
                   "purge raises the solid line and leaves the dashed one near 0.")
        left, right = st.columns([3, 1])
        with left:
            concept = st.selectbox("Concept", concepts, key=f"purge-concept-{rid}")
        with right:
            log_x = st.checkbox("log share axis", key=f"purge-log-{rid}", help="points that remove nothing are not drawn")
        st.plotly_chart(figures.purge_figure(run["purge"], concept, log_x), key=f"purge-{rid}")
        kinds = {label(kind): kind for kind in dict.fromkeys(r["kind"] for r in run["comparison"])}
        kind = kinds[st.selectbox("Most correlated units of", list(kinds), key=f"purge-kind-{rid}")]
        taus = sorted({r["tau"] for r in run["purge"] if (r["kind"], r["concept"]) == (kind, concept)}) or None
        top = cached.call(reads.correlation, path, rid, kind, concept)
        if top:
            st.dataframe(reads.correlation_table(top, kind, taus), hide_index=True)
            st.caption(f"The {len(top)} {label(kind)} with the largest ρ with '{concept}' (Pearson correlation of the unit's "
                       "score with the concept's indicator, on the fit tokens)"
                       + ("; 'removed from τ': the largest threshold whose purge removes it." if taus else "."))
        else:
            st.caption(f"No correlations stored for {label(kind)} and '{concept}'.")

    # -- per-token routing ------------------------------------------------------------------------
    st.header("Per-token routing")
    layers = run["layers"]
    layer = st.selectbox("Layer", layers, key=f"route-layer-{rid}") if len(layers) > 1 else layers[0]
    contexts = cached.call(reads.route_contexts, path, rid, layer)
    if not contexts:
        st.info(f"No routes stored for layer {layer} of this run.")
        return
    rows = {f"context {c['row']} · {c['grp'] or 'no domain'} · {c['tokens']} tokens": c["row"] for c in contexts}
    row = rows[st.selectbox("Evaluation context", list(rows), key=f"route-row-{rid}-{layer}")]
    context = cached.call(reads.route_context, path, rid, layer, row, run["model"])
    left, right = st.columns([1, 3])
    with left:
        highlight_on = st.checkbox("Highlight one expert", key=f"route-highlight-on-{rid}")
    with right:
        highlight = st.number_input("Expert", min_value=0, max_value=run["n_experts"] - 1, value=0, step=1,
                                    key=f"route-highlight-{rid}", disabled=not highlight_on)
    weight_name = "routing weight" if router else "expert score ‖a‖"
    shown = int(highlight) if highlight_on else None
    st.markdown(view.routing_html(context["tokens"], context["routes"], highlight=shown, vmax=1.0 if router else None,
                                  bos_routed=router, weight_name=weight_name), unsafe_allow_html=True)
    if shown is None:
        st.markdown(view.routing_legend_html(context["routes"]), unsafe_allow_html=True)
        st.caption(f"Each token on its top-1 expert's colour at layer {layer}; hover a token for its {run['k']} selected "
                   f"experts and {weight_name}s, best first.")
    else:
        scale = "routing weight (1 = all of the token's routing)" if router else \
            "score / its largest score in this context"
        st.caption(f"Orange opacity ∝ expert {shown}'s {scale}; blank where it was not among the token's top {run['k']}.")
    if context["strings"] == "ids":
        st.caption(f"Token ids in ⟨⟩: the workspace has no vocabulary of `{run['model']}` and it is not a local model "
                   "folder, so the app does not load its tokenizer.")


if data["runs"]:
    runs = {reads.run_label(r): r for r in data["runs"]}
    moe_run(runs[st.selectbox("MoE run", list(runs), index=len(runs) - 1, key="moe-run")])

st.header("Sparse probing")
if not data["probes"]:
    st.info("No probing results yet: run `workbench probe --db WORKSPACE --sae SAE --k 1 --k 2 --k 5`.")
else:
    st.caption("SAEBench sparse probing: test accuracy of logistic regression on the k SAE latents (or raw residual "
               "dimensions) with the largest class-mean difference, and of a full linear probe on the residual.")
    st.dataframe(reads.probing_table(data["probe_rows"]), hide_index=True)
    for probe in data["probes"]:
        for notice in probe["skipped"]:
            st.caption(f"{probe['sae']}: {notice}")
