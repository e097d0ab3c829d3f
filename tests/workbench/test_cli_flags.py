"""The command line is built from the configuration dataclasses: every config field is a flag,
every flag is a field or one of the command's own few flags, every option says what it does,
and the top-level help imports nothing heavy."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

import saes
from probes.moe_request import MoeRequest
from probes.series import SeriesPlan
from workbench.caching import CacheRequest
from workbench.cli import COMMANDS, build_parser, main
from workbench.steering import Intervention

# command path -> (the dataclasses whose fields it offers, fields left out on purpose, the command's own flags)
GENERATED = {
    ("cache",): ([CacheRequest], set(), {"db", "device", "model_dtype"}),
    ("train",): ([saes.SAEConfig, saes.TrainConfig], {"d_in", "sae", "progress_bar"},
                 {"db", "hook", "run", "name", "out", "no_downstream", "device", "model_dtype"}),
    ("sparsity", "series"): ([SeriesPlan], set(), {"db", "out"}),
    ("moe", "run"): ([MoeRequest], set(), {"db", "quiet", "model_dtype"}),
    ("steer",): ([Intervention], {"vector"},
                 {"db", "spec", "prompt", "max_new_tokens", "temperature", "seed", "model", "device", "model_dtype"}),
}


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser(every=True)
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, (*path, name))


def dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


@pytest.mark.parametrize("path", list(GENERATED), ids=" ".join)
def test_every_config_field_is_a_flag_and_every_flag_a_field(path):
    configs, left_out, own = GENERATED[path]
    fields = {f.name for cls in configs for f in dataclasses.fields(cls)} - left_out
    flags = dests(subparser(path))
    assert fields <= flags, f"fields without a flag: {sorted(fields - flags)}"
    assert flags <= fields | own, f"flags that are neither a field nor the command's own: {sorted(flags - fields - own)}"


def test_flags_parse_back_into_the_configs():
    args = build_parser(every=True).parse_args(
        ["train", "--db", "w.duckdb", "--hook", "h", "--width", "64", "--k", "4", "--tokens", "1e6", "--arch", "batchtopk",
         "--no-normalize-inputs", "--adam-betas", "0.8", "0.99", "--bf16"])
    from workbench.cli.options import config_from

    train = config_from(args, saes.TrainConfig)
    assert (train.total_tokens, train.adam_betas, train.bf16_autocast) == (1_000_000, (0.8, 0.99), True)
    assert train.checkpoint_every == saes.TrainConfig().checkpoint_every  # one default, the config's
    sae = config_from(args, saes.SAEConfig, d_in=8)
    assert (sae.arch, sae.width, sae.k, sae.normalize_inputs) == ("batchtopk", 64, 4, False)
    plan = config_from(build_parser(every=True).parse_args(
        ["sparsity", "series", "--db", "w.duckdb", "--activation", "relu", "--ratio", "2", "--ratio", "8"]), SeriesPlan)
    assert (plan.activations, plan.width_depth_ratios, plan.d_model) == (("relu",), (2.0, 8.0), SeriesPlan().d_model)
    request = config_from(build_parser(every=True).parse_args(["moe", "run", "--db", "w.duckdb", "--curve", "2"]), MoeRequest)
    assert request.ks == (2,) and request.mask == MoeRequest().mask  # a repeatable flag not given keeps the default


def test_architecture_choices_come_from_the_registry():
    arch = next(a for a in subparser(("train",))._actions if a.dest == "arch")
    assert list(arch.choices) == saes.architecture_names()


def test_every_option_says_what_it_does_and_every_command_shows_an_example():
    for path, parser in all_parsers(build_parser(every=True)):
        for action in parser._actions:
            assert action.help, f"{' '.join(path)} {action.option_strings or action.dest} has no help"
        if path:
            assert parser.epilog and "example:" in parser.epilog and "workbench " in parser.epilog, path


def test_help_shows_defaults_from_the_configs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert f"(default: {saes.TrainConfig().batch_size})" in out and "--no-normalize-inputs" in out


def test_top_level_help_and_version_load_no_model_library():
    code = ("import sys, contextlib, io\n"
            "from workbench.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "    assert out.getvalue(), argv\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'scipy', 'sklearn', 'duckdb') if m in sys.modules)\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_command_in_the_table_builds(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"usage: workbench {name}" in capsys.readouterr().out
