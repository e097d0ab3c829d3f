"""benchmarks/gpu_check.py at toy shapes on the CPU: every check runs and none fails, so the
script a GPU session runs in one call cannot rot between GPU sessions. On a CUDA machine the same
command at full shapes is the GPU check (README, "Checking on a GPU")."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_check_runs_at_toy_shapes_on_the_cpu(gpu_check, capsys):
    status = gpu_check.main(["--smoke", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert status == 0, "\n".join(lines)
    assert not [line for line in checks if line.startswith("FAIL")]
    letters = {line.split("(")[1][0] for line in checks}
    assert letters == set("0abcdefgh")
    assert all(line.startswith("PASS") for line in checks if "(a)" in line)  # the CPU-vs-device comparison ran


def test_a_failing_check_is_one_fail_line_and_exit_status_1(gpu_check, capsys):
    check = gpu_check.Check()
    check.run("broken", lambda: 1 / 0)
    check.run("skipped", lambda: (None, "n/a"))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL  broken") and "ZeroDivisionError" in out[0]
    assert out[1].startswith("SKIP  skipped") and check.failed == 1
