"""The Steering page under ``AppTest`` on the small analysed workspace (tiny-llama, TopK SAE).

It renders from a "steer with this" link, generates baseline and steered continuations on a button
press, draws the strength sweep, saves the spec by name into the workspace's specs folder only, and
turns bad input into one error line (more hostile input: test_app_bad_input.py).
"""

import json

import pytest

from workbench.steering import SteeringSpec

SAE = "tiny-topk"


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def continuations(at) -> list[str]:
    return [m.value for m in at.markdown if 'class="wb-continuation"' in m.value]


def shown_spec(at) -> dict:
    (code,) = at.code
    return json.loads(code.value)


def test_feature_page_links_to_steering(app_workspace, busiest_feature, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=busiest_feature)
    no_exception(at)
    links = {p.proto.label: p.proto for p in at.get("page_link")}
    assert links["Steer with this"].query_string == f"sae={SAE}&feature={busiest_feature}"
    assert links["Steer with this"].page == "Steering"  # the page named by 4_Steering.py


def test_page_renders_from_the_link(app_workspace, busiest_feature, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature=busiest_feature)
    no_exception(at)
    assert not errors(at)
    assert at.title[0].value == "Steering"
    assert at.selectbox(key="steer_sae").value == SAE
    assert at.text_input(key="steer_features").value == str(busiest_feature)
    assert at.selectbox(key=f"steer_method_{busiest_feature}").value == "add"
    assert at.selectbox(key=f"steer_unit_{busiest_feature}_add").value == "feature_p99"  # the library's default unit
    slider = at.slider(key=f"steer_strength_{busiest_feature}_add_feature_p99")
    assert slider.label == "strength (feature_p99)" and slider.value == 4.0
    assert any("1 unit = σ = " in c.value and "over the analysis" in c.value for c in at.caption)  # read from feature_stats
    (iv,) = shown_spec(at)["interventions"]
    assert iv == {"source": SAE, "index": busiest_feature, "method": "add", "strength": 4.0, "unit": "feature_p99"}
    assert not continuations(at) and not at.get("plotly_chart")  # nothing runs before a button press
    assert [b.proto.label for b in at.get("download_button")] == ["Download spec"]


def test_generate_shows_baseline_and_steered_side_by_side(app_workspace, busiest_feature, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature=busiest_feature)
    # a raw added vector of norm 50 (the tiny model's residual norm is a few units): the sample must change,
    # whatever the feature's p99 is on the corpus this machine's packages make (10 × p99 did not, on one)
    at.selectbox(key=f"steer_unit_{busiest_feature}_add").set_value("raw").run()
    at.slider(key=f"steer_strength_{busiest_feature}_add_raw").set_value(50.0)
    at.number_input(key="steer_new_tokens").set_value(8)
    at.button(key="steer_generate").click().run()
    no_exception(at)
    assert not errors(at)
    baseline, steered = continuations(at)
    prompt = "The most important thing to remember is"
    assert prompt in baseline and prompt in steered
    assert baseline != steered
    assert any("temperature 0.7, seed 0" in c.value for c in at.caption)
    at.run()  # a rerun keeps the result without generating again
    assert continuations(at) == [baseline, steered]


def test_several_features_and_methods(app_workspace, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature="1,2,3")
    no_exception(at)
    at.selectbox(key="steer_method_2").set_value("clamp").run()
    at.selectbox(key="steer_method_3").set_value("ablate").run()
    no_exception(at)
    assert not errors(at)
    methods = [(iv["index"], iv["method"], iv.get("unit")) for iv in shown_spec(at)["interventions"]]
    assert methods == [(1, "add", "feature_p99"), (2, "clamp", "raw"), (3, "ablate", "raw")]
    at.number_input(key="steer_new_tokens").set_value(4)
    at.button(key="steer_generate").click().run()
    no_exception(at)
    assert len(continuations(at)) == 2


def test_sweep_draws_the_curve(app_workspace, busiest_feature, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature=busiest_feature)
    at.text_input(key="steer_strengths").input("0, 2, 4")
    at.button(key="steer_sweep").click().run()
    no_exception(at)
    assert not errors(at)
    (chart,) = at.get("plotly_chart")
    traces = [t["name"] for t in json.loads(chart.proto.spec)["data"]]
    assert traces == [f"Δ log P top tokens · add {busiest_feature}", "KL on neutral text"]
    table = at.dataframe[0].value
    assert table["strength"].tolist() == [0.0, 2.0, 4.0]
    assert table["KL neutral"].iloc[0] == pytest.approx(0.0, abs=1e-6) and table["KL neutral"].iloc[2] > 0
    assert table[f"Δ log P · {busiest_feature}"].iloc[2] > table[f"Δ log P · {busiest_feature}"].iloc[0]


def test_save_spec_into_the_workspace_specs_folder(workspace_copy, busiest_feature, open_page):
    at = open_page(workspace_copy, "steering", sae=SAE, feature=busiest_feature)
    folder = workspace_copy.with_name("copy.specs")  # copy.duckdb → copy.specs beside it
    assert any(f"`{folder}`" in c.value for c in at.caption)  # the page says where specs go
    assert not at.checkbox(key="steer_spec_overwrite").value
    at.text_input(key="steer_spec_name").input("boost-1")
    at.button(key="steer_save").click().run()
    no_exception(at)
    assert not errors(at)
    target = folder / "boost-1.json"
    (message,) = [s.value for s in at.success]
    assert message.startswith(f"Saved `{target}`.")
    assert f"workbench steer --db {workspace_copy} --spec {target} --prompt ..." in message  # how to reuse it
    assert SteeringSpec.load(target) == SteeringSpec.from_dict(shown_spec(at))
    assert sorted(p.name for p in workspace_copy.parent.iterdir()) == ["copy.duckdb", "copy.specs"]
    assert [p.name for p in folder.iterdir()] == ["boost-1.json"]


def test_saving_under_an_existing_name_needs_overwrite(workspace_copy, busiest_feature, open_page):
    folder = workspace_copy.with_name("copy.specs")
    folder.mkdir()
    (folder / "kept.json").write_text("{}\n")
    at = open_page(workspace_copy, "steering", sae=SAE, feature=busiest_feature)
    at.text_input(key="steer_spec_name").input("kept")
    at.button(key="steer_save").click().run()
    no_exception(at)
    assert errors(at) == [f"spec 'kept' exists in {folder}: tick 'Overwrite' to replace it, or choose another name"]
    assert not at.success and (folder / "kept.json").read_text() == "{}\n"
    at.checkbox(key="steer_spec_overwrite").check()
    at.button(key="steer_save").click().run()
    no_exception(at)
    assert not errors(at) and [s.value for s in at.success][0].startswith(f"Saved `{folder / 'kept.json'}`.")
    assert SteeringSpec.load(folder / "kept.json") == SteeringSpec.from_dict(shown_spec(at))
    assert [p.name for p in folder.iterdir()] == ["kept.json"]  # replaced in place, no temporary left


@pytest.mark.parametrize("name, message", [
    ("", "give the spec a name: "),
    ("../escaped", "invalid spec name '../escaped': use letters, digits"),
    ("/tmp/spec", "invalid spec name '/tmp/spec': use letters, digits"),
])
def test_a_path_is_not_a_spec_name(workspace_copy, busiest_feature, open_page, name, message):
    at = open_page(workspace_copy, "steering", sae=SAE, feature=busiest_feature)
    at.text_input(key="steer_spec_name").input(name)
    at.button(key="steer_save").click().run()
    no_exception(at)
    (error,) = errors(at)
    assert error.startswith(message)
    assert not at.success
    assert [p.name for p in workspace_copy.parent.iterdir()] == ["copy.duckdb"]  # not even the specs folder


@pytest.mark.parametrize("query, message", [
    ({"feature": 999}, f"feature 999 out of range: SAE '{SAE}' has 128 latents (0..127)"),
    ({"feature": "5,128"}, f"feature 128 out of range: SAE '{SAE}' has 128 latents (0..127)"),
    ({"feature": "abc"}, "feature ids must be whole numbers separated by commas, got 'abc'"),
    ({"feature": "-3"}, "feature ids must be non-negative, got -3"),
    ({"sae": "nope", "feature": 1}, f"no SAE 'nope' in ws.duckdb; available: 1:{SAE}"),
])
def test_bad_input_is_one_error_line(app_workspace, open_page, query, message):
    at = open_page(app_workspace, "steering", **{"sae": SAE, **query})
    no_exception(at)
    assert errors(at) == [message]
    assert not at.get("slider") or not any(s.key and s.key.startswith("steer_strength") for s in at.slider)


def test_bad_strengths_in_the_sweep_are_one_error_line(app_workspace, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature=1)
    at.text_input(key="steer_strengths").input("0, 1, nan")
    at.button(key="steer_sweep").click().run()
    no_exception(at)
    (message,) = errors(at)  # the wording (and the bound on |strength|) belong to parse_strengths
    assert message.startswith("strength must be ") and message.endswith("got nan")
    assert not at.get("plotly_chart")
