"""Pretrained SAEs by name (``saelens:RELEASE/SAE_ID``), offline: sae-lens's downloader is pointed at
files made here, and a fake release whose model and hook are tiny-llama's joins the registry.

Every bad input is one line, exit status 2, with the workspace's tables and files as they were.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.workspace import Workspace

HOOK = "blocks.1.hook_resid_post"
RELEASE = "tiny-llama-res-test"
REPO = "tests/tiny-llama-saes"
ID = f"{HOOK}/width_96"  # ids may hold '/': the release ends at the first one
SPEC = f"saelens:{RELEASE}/{ID}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("pretrained") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "4096", "--ctx", "32", "--db", str(db)]) == 0
    return db


@pytest.fixture
def ws(built, private_copy) -> Path:
    """A private copy of the cached workspace inside tmp_path/home; the test runs in tmp_path."""
    return private_copy(built)


def write_sae_lens_sae(folder: Path, *, hook: str, d_in: int = 64, d_sae: int = 96, arch: str = "jumprelu") -> None:
    """An SAE saved by sae-lens itself (its classes, its save_model), as a hub repository holds it."""
    from sae_lens import SAE

    torch.manual_seed(0)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"hook_name": hook, "model_name": "tiny-llama", "context_size": 32, "prepend_bos": True}}
    if arch == "topk":
        cfg.update(k=8, rescale_acts_by_decoder_norm=True)
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    sae.save_model(folder)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict:
    """A fake hub repository under tmp_path/hub served by a fake ``hf_hub_download`` (calls counted),
    and a fake release of three SAEs in sae-lens's registry: the right hook, a hook the workspace lacks,
    and a transcoder-like architecture this workbench does not read."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from huggingface_hub.errors import LocalEntryNotFoundError
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    root = tmp_path / "hub"
    write_sae_lens_sae(root / REPO / ID, hook=HOOK)
    write_sae_lens_sae(root / REPO / "blocks.0.hook_resid_post/width_96", hook="blocks.0.hook_resid_post")
    write_sae_lens_sae(root / REPO / "pre/width_96", hook="blocks.2.hook_resid_pre")  # = blocks.1.hook_resid_post
    write_sae_lens_sae(root / REPO / "wide/width_96", hook=HOOK, d_in=32)
    for arch in ("standard", "topk", "gated"):
        write_sae_lens_sae(root / REPO / f"{arch}/width_96", hook=HOOK, arch=arch)
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append(filename)
        path = root / repo_id / filename
        if not path.is_file():
            raise LocalEntryNotFoundError(f"no {filename} in {repo_id}")
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    ids = [ID, "blocks.0.hook_resid_post/width_96", "pre/width_96", "wide/width_96", "standard/width_96", "topk/width_96",
           "gated/width_96"]
    entry = PretrainedSAELookup(release=RELEASE, repo_id=REPO, model="tiny-llama", conversion_func=None,
                                saes_map={i: i for i in ids}, expected_var_explained={}, expected_l0={},
                                neuronpedia_id={}, norm_scaling_factor={}, config_overrides=None)
    monkeypatch.setitem(get_pretrained_saes_directory(), RELEASE, entry)
    monkeypatch.setitem(get_pretrained_saes_directory(), RELEASE + "-gpt2",
                        PretrainedSAELookup(**{**entry.__dict__, "release": RELEASE + "-gpt2", "model": "gpt2-small"}))
    return {"calls": calls, "root": root}


def sae_rows(db: Path) -> list[tuple]:
    with Workspace(db, read_only=True) as w:
        return w.query("SELECT name, hook, status, path FROM saes ORDER BY sae_id")


def test_a_pretrained_sae_registers_evaluates_and_is_found_by_its_spec(ws, hub, capsys, expect_one_line):
    assert main(["eval", "--db", str(ws), "--sae", SPEC, "--device", "cpu"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    name = f"{RELEASE}.{HOOK}.width_96"
    assert f"'{name}'" in out and "fvu" in out and "ce_loss_recovered" in out
    folder = ws.with_suffix(".saes") / "saelens" / RELEASE / HOOK / "width_96"
    assert sae_rows(ws) == [(name, HOOK, "done", str(folder.resolve()))]
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    assert not list(ws.parent.glob(".workbench-saelens-*"))  # the conversion's temporary folder is gone

    # the converted SAE computes what sae-lens's SAE computes on the same inputs
    from sae_lens import SAE

    import saes

    ours, theirs = saes.load_sae(folder), SAE.load_from_disk(hub["root"] / REPO / ID)
    x = torch.randn(8, 64)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-4)

    # commands taking a workspace SAE accept the spec it came from
    assert main(["analyze", "--db", str(ws), "--sae", SPEC, "--no-logits"]) == 0, capsys.readouterr().err
    assert "sae 1:" in capsys.readouterr().out
    from workbench.steering import SteeringError
    from workbench.steering.sources import load_steering_sae
    from workbench.workspace import Workspace

    with Workspace(ws, read_only=True) as opened:  # steering takes it too, with the hook it was registered on
        ref = load_steering_sae(SPEC, opened)
        assert (ref.label, ref.hook) == (name, HOOK) and torch.equal(ref.sae.W_dec, ours.W_dec)
    with pytest.raises(SteeringError, match="register it with `workbench eval"):
        load_steering_sae(SPEC)

    # a second registration (another name) reuses the converted folder: no download at all
    hub["calls"].clear()
    assert main(["eval", "--db", str(ws), "--sae", SPEC, "--no-downstream", "--name", "again"]) == 0
    assert hub["calls"] == []
    capsys.readouterr()
    err = expect_one_line(["analyze", "--db", str(ws), "--sae", SPEC, "--no-logits"], capsys)
    assert "registered several times" in err and "again" in err


def test_the_sae_hook_may_be_given_and_resid_pre_is_the_previous_resid_post(ws, hub, capsys):
    assert main(["eval", "--db", str(ws), "--sae", f"saelens:{RELEASE}/pre/width_96", "--hook", HOOK, "--no-downstream"]) == 0
    assert [r[1] for r in sae_rows(ws)] == [HOOK]


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_other_architectures_convert_to_the_same_function(arch, ws, hub, capsys):
    from sae_lens import SAE

    import saes

    assert main(["eval", "--db", str(ws), "--sae", f"saelens:{RELEASE}/{arch}/width_96", "--no-downstream"]) == 0
    [(name, _, status, path)] = sae_rows(ws)
    assert (name, status) == (f"{RELEASE}.{arch}.width_96", "done")
    ours, theirs = saes.load_sae(path), SAE.load_from_disk(hub["root"] / REPO / arch / "width_96")
    x = torch.randn(8, 64)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-4)


def test_a_spec_not_registered_yet_says_how_to_register_it(ws, hub, capsys, table_digest, expect_one_line):
    before = table_digest(ws)
    err = expect_one_line(["analyze", "--db", str(ws), "--sae", SPEC, "--no-logits"], capsys)
    assert f"run `workbench eval --db {ws} --sae {SPEC}` first" in err
    assert table_digest(ws) == before


BAD = {
    "malformed": ("saelens:no-slash", "write saelens:RELEASE/SAE_ID"),
    "unknown-release": ("saelens:gemma-scope-2b-pt-res-canonicl/layer_0/width_16k/canonical",
                        "unknown sae-lens release 'gemma-scope-2b-pt-res-canonicl'; closest: gemma-scope-2b-pt-res-canonical"),
    "repo-not-release": ("saelens:google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105",
                         "'google/gemma-scope-2b-pt-res' is a Hugging Face repository, not a sae-lens release"),
    "unknown-id": ("saelens:gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonicl",
                   "has no SAE 'layer_0/width_16k/canonicl'; closest: layer_0/width_16k/canonical"),
    # the real registry entry: its config is derived offline, and it was trained on another model
    "real-model-mismatch": ("saelens:gemma-scope-2b-pt-res-canonical/layer_1/width_16k/canonical",
                            "was trained on model 'gemma-2-2b', but run 1 of ws.duckdb cached "
                            "'blocks.1.hook_resid_post' with 'tiny-llama'"),
    "model-mismatch": (f"saelens:{RELEASE}-gpt2/{ID}", "was trained on model 'gpt2-small'"),
    "hook-not-cached": (f"saelens:{RELEASE}/blocks.0.hook_resid_post/width_96",
                        "reads hook 'blocks.0.hook_resid_post', which ws.duckdb has not cached (cached: blocks.1.hook_resid_post)"),
    "hook-differs": (f"saelens:{RELEASE}/blocks.0.hook_resid_post/width_96 --hook {HOOK}",
                     f"reads hook 'blocks.0.hook_resid_post', not --hook '{HOOK}'"),
    "width-differs": (f"saelens:{RELEASE}/wide/width_96", "has d_in=32, but 'blocks.1.hook_resid_post' of run 1 has d=64"),
    "weights-not-cached": (SPEC, f"{SPEC} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset it"),
    "architecture": (f"saelens:{RELEASE}/gated/width_96", "is a 'gated' SAE; this workbench reads standard, topk, jumprelu"),
    "real-hook-z": ("saelens:gemma-scope-2b-pt-att-canonical/layer_1/width_16k/canonical",
                    "reshapes its hook's activations (hook_z: attention heads concatenated)"),
    "bad-name": (f"{SPEC} --name ../escape", "invalid SAE name '../escape'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pretrained_specs_are_one_line_and_change_nothing(case, ws, hub, tmp_path, capsys, table_digest, expect_one_line, files_under):
    text, phrase = BAD[case]
    spec, *extra = text.split()
    if case == "weights-not-cached":  # the config is there, the weights are not: the conversion leaves nothing
        (hub["root"] / REPO / ID / "sae_weights.safetensors").unlink()
    before_tables, before_files = table_digest(ws), files_under(tmp_path)
    err = expect_one_line(["eval", "--db", str(ws), "--sae", spec, "--no-downstream", *extra], capsys)
    assert phrase in err
    assert table_digest(ws) == before_tables
    assert files_under(tmp_path) == before_files


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "closed port"])
def test_an_unreachable_hub_fails_fast_with_one_line(offline, ws, tmp_path, capsys, monkeypatch, table_digest, expect_one_line):
    """A real registry entry whose config must be downloaded; nothing in the (empty) cache."""
    from huggingface_hub import constants

    from workbench.data.hub import hub_unreachable

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    if offline == "closed port":
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    hub_unreachable.cache_clear()
    spec = "saelens:gpt2-small-res-jb/blocks.1.hook_resid_pre"
    before = table_digest(ws)
    start = time.monotonic()
    try:
        err = expect_one_line(["eval", "--db", str(ws), "--sae", spec, "--no-downstream"], capsys)
    finally:
        hub_unreachable.cache_clear()
    assert time.monotonic() - start < 10
    reason = "HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "the hub at 127.0.0.1 is unreachable"
    assert f"{spec} is not in the local Hugging Face cache and {reason}" in err
    assert table_digest(ws) == before
    assert not list(ws.parent.glob(".workbench-saelens-*")) and not ws.with_suffix(".saes").exists()


def test_eval_of_a_folder_still_needs_hook(ws, capsys, expect_one_line):
    err = expect_one_line(["eval", "--db", str(ws), "--sae", str(ws.parent)], capsys)
    assert "--hook is required unless --sae names a pretrained SAE" in err


@pytest.mark.parametrize("a, b, same", [
    ("gemma-2-2b", "google/gemma-2-2b", True),
    ("gpt2-small", "gpt2", True),
    ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped", True),
    ("gemma-2-2b", "gemma-2-2b-it", False),
    ("tiny-llama", "/models/tiny-llama", True),
    ("gpt2-small", "smollm2-135m", False),
])
def test_model_names_are_compared_by_what_they_name(a, b, same):
    from workbench.pretrained import same_model

    assert same_model(a, b) is same


def test_spec_parsing_splits_at_the_first_slash():
    from workbench.pretrained import default_name, parse_spec

    spec = parse_spec("saelens:gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical")
    assert (spec.release, spec.sae_id) == ("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical")
    assert default_name(spec) == "gemma-scope-2b-pt-res-canonical.layer_0.width_16k.canonical"
    assert str(spec) == "saelens:gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical"
