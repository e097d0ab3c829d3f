"""The app's presentation helpers: escaping of token text and the L0/FVU frontier."""

from types import SimpleNamespace

from workbench.app import render


def test_token_text_is_escaped_and_newlines_visible():
    html = render.token_spans(["<b>", "\n  ", "$x$ *y* :red[z]", "a|b\\"], [1.0, 0.0, 0.5, 2.0], vmax=2.0, focus=0)
    assert "<b>" not in html and "&lt;b&gt;" in html
    assert "\n" not in html and "↵  " in html
    text = "".join(part.split(">", 1)[1] for part in html.split("</span>") if ">" in part)  # the tokens' markup
    assert all(c not in text for c in "$*[]|:\\")  # markdown specials are entities: &#36; &#42; ...
    assert "&#36;x&#36;" in text and "&#58;red&#91;z&#93;" in text
    assert html.count('class="wb-token"') == 4 and html.count("outline:") == 1
    assert "rgba(255,145,0,0.00)" in html and "rgba(255,145,0,1.00)" in html  # zero and full activation


def test_example_html_is_one_line():
    ex = SimpleNamespace(tokens=["a", "\n", "b"], values=[0.0, 1.0, 2.0], focus=2, value=2.0)
    html = render.example_html(ex, vmax=2.0)
    assert "\n" not in html and html.startswith('<div class="wb-example"') and "2.000" in html


def test_frontier_keeps_points_nobody_beats():
    points = [(4, 0.7), (8, 0.5), (8, 0.6), (16, 0.55), (32, 0.3), (2, 0.9)]
    assert render.frontier(points) == [5, 0, 1, 4]
    assert render.frontier([]) == []
