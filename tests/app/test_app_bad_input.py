"""The app's pages under hostile input, on a private copy of the small analysed workspace.

Every case drives one page with bad input (a spec name that is a path or SQL, an unknown SAE, a
feature out of range, a NaN or huge strength, an invalid regex) and checks the same three things:

- the page shows exactly one error line: no exception, no traceback text;
- every table of the workspace hashes the same before and after (read-only, ordered by all columns);
- no file appeared, vanished or changed anywhere beside the workspace (its parent folder, listed
  recursively), so nothing was written outside the workspace's specs folder.

A valid name saves into ``<workspace>.specs/`` as JSON that ``SteeringSpec`` loads back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest

from workbench.safety import UnsafeInputError
from workbench.steering import SteeringError, SteeringSpec
from workbench.steering.store import save_named, spec_folder

SAE = "tiny-topk"
EXISTING = "existing"  # a spec saved before the tests: saving under its name needs "Overwrite"
TRACEBACK_MARKS = ("Traceback (most recent call last)", 'File "')


# -- helpers ---------------------------------------------------------------------------------------
def quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def table_hashes(db: Path) -> dict[str, str]:
    """sha256 of every table of the DuckDB file (its columns, types and rows ordered by all columns),
    read through a read-only connection that is closed again before the app runs."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        tables = con.execute("SELECT database_name, schema_name, table_name FROM duckdb_tables() "
                             "WHERE NOT internal AND NOT temporary ORDER BY ALL").fetchall()
        for database, schema, table in tables:
            name = ".".join(map(quoted, (database, schema, table)))
            digest = hashlib.sha256()
            cursor = con.execute(f"SELECT * FROM {name} ORDER BY ALL")
            digest.update(repr([(c[0], str(c[1])) for c in cursor.description]).encode())
            while rows := cursor.fetchmany(4096):
                for row in rows:
                    digest.update(repr(row).encode())
            out[f"{schema}.{table}"] = digest.hexdigest()
        return out
    finally:
        con.close()


def listing(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its kind, size and content hash (files) or link target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def page_texts(at) -> list[str]:
    """The text of everything the page shows that could carry a traceback."""
    kinds = ("error", "warning", "info", "success", "exception", "markdown", "caption", "code", "text")
    return [str(getattr(e, "value", "")) for kind in kinds for e in at.get(kind)]


def assert_one_error_line(at) -> str:
    assert not at.exception, [e.value for e in at.exception]
    messages = [e.value for e in at.error]
    assert len(messages) == 1, messages
    (message,) = messages
    assert message and "\n" not in message and len(message) < 500, message
    for text in page_texts(at):
        assert not any(mark in text for mark in TRACEBACK_MARKS), text
    return message


# -- the workspace ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_workspace(app_workspace, tmp_path_factory) -> Path:
    """A private copy in a folder of its own, with one spec already saved (``existing.json``)."""
    db = tmp_path_factory.mktemp("bad_input") / "ws.duckdb"
    shutil.copy(app_workspace, db)
    save_named(SteeringSpec.single(source=SAE, index=1, strength=2.0), db, EXISTING)
    return db


@pytest.fixture
def unchanged(hostile_workspace):
    """Checks, after the test, that no table and no file beside the workspace changed."""
    folder = hostile_workspace.parent
    tables, files = table_hashes(hostile_workspace), listing(folder)
    assert tables and "main.saes" in tables
    yield hostile_workspace
    assert table_hashes(hostile_workspace) == tables
    assert listing(folder) == files
    assert not (folder.parent / "escaped.json").exists() and not Path("/abs/path.json").exists()


# -- the cases -------------------------------------------------------------------------------------
def save_as(name: str, *, raw: bool = False):
    """Type ``name`` as the spec name and press Save (``raw``: set as a client would send it, unchecked)."""
    def act(at):
        box = at.text_input(key="steer_spec_name")
        box.set_value(name) if raw else box.input(name)
        at.button(key="steer_save").click().run()
    return act


def sweep_with(strengths: str):
    def act(at):
        at.text_input(key="steer_strengths").input(strengths)
        at.button(key="steer_sweep").click().run()
    return act


def type_into(key: str, text: str):
    def act(at):
        at.text_input(key=key).input(text).run()
    return act


def feature_search(mode: str, text: str):
    def act(at):
        at.radio(key="search_mode").set_value(mode).run()
        at.text_input(key="search_text").input(text).run()
    return act


NAME_RULES = "use letters, digits, '.', '_' and '-'"
CASES = [
    # spec names: never a path, never SQL, never a silent overwrite, never a 10,000-character echo
    pytest.param("steering", {}, save_as("../../escaped"), "invalid spec name '../../escaped': " + NAME_RULES, id="name-dotdot"),
    pytest.param("steering", {}, save_as("/abs/path"), "invalid spec name '/abs/path': " + NAME_RULES, id="name-absolute"),
    pytest.param("steering", {}, save_as("a/b"), "invalid spec name 'a/b': " + NAME_RULES, id="name-separator"),
    pytest.param("steering", {}, save_as(".hidden"), "invalid spec name '.hidden': " + NAME_RULES, id="name-hidden"),
    pytest.param("steering", {}, save_as(".."), "invalid spec name '..': " + NAME_RULES, id="name-parent"),
    pytest.param("steering", {}, save_as(""), "give the spec a name: ", id="name-empty"),
    pytest.param("steering", {}, save_as("   "), "give the spec a name: ", id="name-blank"),
    pytest.param("steering", {}, save_as("x'; DROP TABLE saes; --"),
                 "invalid spec name \"x'; DROP TABLE saes; --\": " + NAME_RULES, id="name-sql"),
    pytest.param("steering", {}, save_as("a\\b"), "invalid spec name 'a\\\\b': " + NAME_RULES, id="name-backslash"),
    pytest.param("steering", {}, save_as("nul\x00byte", raw=True), "invalid spec name 'nul\\x00byte': " + NAME_RULES, id="name-nul"),
    pytest.param("steering", {}, save_as("two\nlines", raw=True), "invalid spec name 'two\\nlines': " + NAME_RULES, id="name-newline"),
    pytest.param("steering", {}, save_as(EXISTING), f"spec '{EXISTING}' exists in ", id="name-exists"),
    pytest.param("steering", {}, save_as(EXISTING + ".json"), f"spec '{EXISTING}' exists in ", id="name-exists-json"),
    pytest.param("steering", {}, save_as("n" * 10_000), "spec name is 10,000 characters long: use at most 128",
                 id="name-10000-chars"),
    # unknown SAE, bad feature indices
    pytest.param("steering", {"sae": "nope"}, None, f"no SAE 'nope' in ws.duckdb; available: 1:{SAE}", id="steering-unknown-sae"),
    pytest.param("feature", {"sae": "nope"}, None, f"no SAE 'nope' in ws.duckdb; available: 1:{SAE}", id="feature-unknown-sae"),
    pytest.param("steering", {"sae": "'; DROP TABLE saes; --"}, None, "no SAE ''; DROP TABLE saes; --' in ws.duckdb",
                 id="steering-sql-sae"),
    pytest.param("steering", {"feature": 999}, None, f"feature 999 out of range: SAE '{SAE}' has 128 latents (0..127)",
                 id="steering-feature-999"),
    pytest.param("steering", {"feature": "-3"}, None, "feature ids must be non-negative, got -3", id="steering-feature-negative"),
    pytest.param("steering", {"feature": "1e9999"}, None, "feature ids must be whole numbers separated by commas, got '1e9999'",
                 id="steering-feature-float"),
    pytest.param("steering", {}, type_into("steer_features", "1, nan"),
                 "feature ids must be whole numbers separated by commas, got 'nan'", id="steering-features-nan"),
    pytest.param("steering", {}, type_into("steer_features", "1, 2, 3, 4, 5, 6, 7, 8, 9"), "at most 8 features at once, got 9",
                 id="steering-too-many-features"),
    pytest.param("feature", {"feature": 999}, None, f"feature 999 is out of range for SAE '{SAE}': valid ids are 0..127",
                 id="feature-999"),
    pytest.param("feature", {"feature": "abc"}, None, "feature id in the URL must be a whole number, got 'abc'", id="feature-abc"),
    # NaN / huge strengths (the sliders' own range is enforced by Streamlit; the sweep's text is not)
    pytest.param("steering", {}, sweep_with("0, 1, nan"), "strength must be ", id="sweep-nan"),
    pytest.param("steering", {}, sweep_with("0, inf"), "strength must be ", id="sweep-inf"),
    pytest.param("steering", {}, sweep_with("0, 1e309"), "strength must be ", id="sweep-overflow"),
    pytest.param("steering", {}, sweep_with("0, 1e300"), "strength must be ", id="sweep-huge"),
    pytest.param("steering", {}, sweep_with("0, 1; DROP TABLE saes"), "strengths must be numbers separated by commas, got '1;'",
                 id="sweep-sql"),
    # the Feature page's search (token regex, run by DuckDB's RE2; feature id)
    pytest.param("feature", {}, feature_search("token regex", "(unclosed"), "invalid regular expression '(unclosed': ",
                 id="search-unclosed"),
    pytest.param("feature", {}, feature_search("token regex", "(?=x)"), "invalid regular expression '(?=x)': ", id="search-lookahead"),
    pytest.param("feature", {}, feature_search("token regex", "')); DROP TABLE saes; --("),
                 "invalid regular expression ", id="search-sql"),
    pytest.param("feature", {}, feature_search("feature id", "seventeen"), "feature id must be a whole number, got 'seventeen'",
                 id="search-id-word"),
]


@pytest.mark.parametrize("page, query, act, message", CASES)
def test_bad_input_is_one_error_line_and_writes_nothing(unchanged, busiest_feature, open_page, page, query, act, message):
    at = open_page(unchanged, page, **{"sae": SAE, "feature": busiest_feature, **query})
    if act is not None:
        assert not at.exception and not at.error, [e.value for e in at.error]  # the page was fine before
        act(at)
    assert assert_one_error_line(at).startswith(message)
    assert not at.success


def test_a_valid_name_saves_into_the_specs_folder(hostile_workspace, busiest_feature, open_page):
    folder = hostile_workspace.with_name("ws.specs")
    assert spec_folder(hostile_workspace) == folder.resolve()
    tables, before = table_hashes(hostile_workspace), listing(hostile_workspace.parent)
    at = open_page(hostile_workspace, "steering", sae=SAE, feature=busiest_feature)
    save_as("boost_6.v2-ok")(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    target = folder / "boost_6.v2-ok.json"
    (success,) = [s.value for s in at.success]
    assert f"`{target}`" in success and f"--spec {target}" in success and f"--db {hostile_workspace}" in success
    shown = json.loads(at.code[0].value)
    saved = json.loads(target.read_text())  # valid JSON ...
    assert saved == shown and SteeringSpec.load(target) == SteeringSpec.from_dict(shown)  # ... that loads back
    assert table_hashes(hostile_workspace) == tables
    after = listing(hostile_workspace.parent)
    added = sorted(set(after) - set(before))
    assert added == ["ws.specs/boost_6.v2-ok.json"]
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else changed
    target.unlink()


def test_overwrite_replaces_only_when_ticked(hostile_workspace, busiest_feature, open_page):
    existing = hostile_workspace.with_name("ws.specs") / f"{EXISTING}.json"
    old = existing.read_text()
    at = open_page(hostile_workspace, "steering", sae=SAE, feature=busiest_feature)
    at.checkbox(key="steer_spec_overwrite").check()
    save_as(EXISTING)(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert existing.read_text() != old
    assert SteeringSpec.load(existing) == SteeringSpec.from_dict(json.loads(at.code[0].value))
    existing.write_text(old)  # as the other tests expect it


@pytest.mark.parametrize("value", [1e300, float("nan"), float("inf"), -1e6])
def test_a_crafted_slider_value_is_refused_by_streamlit(unchanged, busiest_feature, open_page, value):
    """A client sending a strength outside the slider's range: Streamlit keeps the slider's value."""
    at = open_page(unchanged, "steering", sae=SAE, feature=busiest_feature)
    at.slider(key=f"steer_strength_{busiest_feature}_add_feature_p99").set_value(value).run()
    assert not at.exception
    (iv,) = json.loads(at.code[0].value)["interventions"]
    assert -10.0 <= iv["strength"] <= 10.0


def test_a_hostile_regex_that_is_valid_runs_as_a_pattern(unchanged, open_page):
    """SQL in the token search is a pattern bound as a parameter: it matches nothing and drops nothing."""
    at = open_page(unchanged, "feature", sae=SAE, feature=0)
    feature_search("token regex", "x'; DROP TABLE saes; --")(at)
    assert not at.exception and not at.error, [e.value for e in at.error]


# -- the library under the page -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "a/b", ".hidden", "", "..", ".json",
                                  "x'; DROP TABLE saes; --", "n" * 10_000, "a\x00b", "ünïcode", None])
def test_save_named_refuses_names_that_are_not_one_plain_component(tmp_path, name):
    db = tmp_path / "w" / "default.duckdb"
    db.parent.mkdir()
    db.write_bytes(b"")
    with pytest.raises(UnsafeInputError) as err:
        save_named(SteeringSpec.single(source=SAE, index=1), db, name)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["default.duckdb", "w"]


def test_save_named_layout_and_overwrite(tmp_path):
    db = tmp_path / "workspaces" / "default.duckdb"
    db.parent.mkdir()
    spec = SteeringSpec.single(source=SAE, index=3, strength=2.0)
    assert spec_folder(db) == (tmp_path / "workspaces" / "default.specs").resolve()
    written = save_named(spec, db, "first")
    assert written == (tmp_path / "workspaces" / "default.specs" / "first.json").resolve()
    assert SteeringSpec.load(written) == spec and json.loads(written.read_text())["version"] == 1
    other = SteeringSpec.single(source=SAE, index=4)
    with pytest.raises(SteeringError, match="exists in .*tick 'Overwrite'"):
        save_named(other, db, "first")
    assert SteeringSpec.load(written) == spec
    assert save_named(other, db, "first.json", overwrite=True) == written
    assert SteeringSpec.load(written) == other
    assert sorted(p.name for p in written.parent.iterdir()) == ["first.json"]


def test_save_named_does_not_follow_links_out_of_the_folder(tmp_path):
    db = tmp_path / "ws.duckdb"
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    folder = tmp_path / "ws.specs"
    folder.mkdir()
    (folder / "link.json").symlink_to(outside)
    spec = SteeringSpec.single(source=SAE, index=1)
    for overwrite in (False, True):
        with pytest.raises(UnsafeInputError, match="outside"):
            save_named(spec, db, "link", overwrite=overwrite)
    assert outside.read_text() == "keep"
    folder.rename(tmp_path / "real")
    (tmp_path / "ws.specs").symlink_to(tmp_path / "real")  # the specs folder itself a link
    with pytest.raises(UnsafeInputError, match="not a plain folder"):
        save_named(spec, db, "fresh")
    assert not (tmp_path / "real" / "fresh.json").exists()
