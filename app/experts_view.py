"""Experts page routing view: one evaluation context's tokens as HTML, coloured by expert, and its legend.

Token text is escaped by ``workbench.app.render.escape`` (quotes included, so a tooltip cannot leave its
attribute); the highlight colour is ``workbench.app.render.HIGHLIGHT``.
"""

from __future__ import annotations

from workbench.app import render

UNMEASURED = "#d0d0d0"  # BOS and separators in the routing view: left out of every metric


def expert_colour(expert: int) -> str:
    """A light categorical colour per expert id (golden-angle hues, so neighbours differ for any E)."""
    return f"hsl({(expert * 137.508) % 360:.1f},70%,78%)"


def routing_html(tokens: list[str], routes: list[dict], *, highlight: int | None = None, vmax: float | None = None,
                 bos_routed: bool = True, weight_name: str = "weight") -> str:
    """One context's tokens as one HTML block. Without ``highlight`` each token's background is its top-1 expert's
    colour (BOS and separators, ``grp`` None, grey); with it the background is orange with opacity ∝ the weight of
    expert ``highlight`` on that token / ``vmax`` (default: the context's largest), 0 where it was not selected.
    The tooltip lists the token's experts and weights, best first (``bos_routed`` False: position 0 is said to
    pass unrouted, as a MoEfied model's BOS does)."""
    if highlight is not None and vmax is None:
        vmax = max((w for r in routes for e, w in zip(r["experts"], r["weights"]) if e == highlight), default=0.0)
    r_, g_, b_ = render.HIGHLIGHT
    spans = []
    for token, route in zip(tokens, routes):
        measured = route["grp"] is not None
        if not bos_routed and route["position"] == 0:
            listing = "not routed: BOS passes the MLP unchanged"
        else:
            listing = "&#10;".join(f"expert {e}: {w:.3f}" for e, w in zip(route["experts"], route["weights"]))
        where = route["grp"] if measured else "BOS / separator, left out of every metric"
        # render.escape also quotes " and ', so the tooltip cannot leave its attribute; &#10; is a line break
        tip = (f"“{render.escape(token)}” · position {route['position']} · {render.escape(where)}"
               f"&#10;{weight_name}s:&#10;{listing}")
        if highlight is None:
            top = route["experts"][0] if route["experts"] else None
            colour = expert_colour(top) if measured and top is not None else UNMEASURED
            style = f"background:{colour}"
        else:
            weight = next((w for e, w in zip(route["experts"], route["weights"]) if e == highlight), 0.0)
            alpha = 0.0 if weight <= 0 or not vmax else min(1.0, weight / vmax) * 0.85 + 0.15
            style = f"background:rgba({r_},{g_},{b_},{alpha:.2f})"
            if not measured:
                style += f";outline:1px dashed {UNMEASURED}"
        spans.append(f'<span class="wb-route" title="{tip}" style="{style};border-radius:2px;padding:1px 0">'
                     f'{render.escape(token)}</span>')
    return ('<div class="wb-routing" style="font-family:ui-monospace,monospace;font-size:0.85rem;white-space:pre-wrap;'
            f'line-height:1.9;margin:0 0 0.5rem 0">{"".join(spans)}</div>')


def routing_legend_html(routes: list[dict]) -> str:
    """The top-1 experts of a context with their colours and token counts (most frequent first), and the grey."""
    counts: dict[int, int] = {}
    for r in routes:
        if r["grp"] is not None and r["experts"]:
            counts[r["experts"][0]] = counts.get(r["experts"][0], 0) + 1
    chips = [f'<span style="background:{expert_colour(e)};border-radius:2px;padding:1px 4px;margin-right:4px">'
             f"expert {e} · {n}</span>" for e, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    chips.append(f'<span style="background:{UNMEASURED};border-radius:2px;padding:1px 4px">BOS / separator</span>')
    return f'<div style="font-size:0.8rem;color:#444;line-height:1.9">top-1 expert (tokens): {"".join(chips)}</div>'
