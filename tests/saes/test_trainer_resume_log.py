"""A resumed training run logs exactly the lines of an uninterrupted one.

The trainer averages loss, FVU, aux loss and L0 over the steps between two log lines; the running
sums are saved with every checkpoint, so a crash after a checkpoint that is not on a log
boundary does not change the first line after the resume. ``tokens_per_s`` is wall-clock time
and is the one field left out of the comparisons.
"""

import json
import math

import pytest
import torch

import saes
from saes import SAEConfig, TrainConfig, train

D = 16
STEPS = 40
HOOK = "blocks.1.hook_resid_post"


def make_batches(n, B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, D, generator=g)
    for _ in range(n):
        coef = torch.rand(B, 48, generator=g) * (torch.rand(B, 48, generator=g) < 0.08)
        yield coef @ dirs + 0.01 * torch.randn(B, D, generator=g)


def configs(arch):
    sc = SAEConfig(d_in=D, width=64, k=4, arch=arch, dead_code_window=3)
    # logs at 5, 10, ..., checkpoints at 7, 14, 21, ...: most checkpoints fall between two log lines
    tc = TrainConfig(batch_size=64, total_tokens=64 * STEPS, warmup_steps=4, log_every=5, checkpoint_every=7,
                     progress_bar=False, dead_tokens=64 * 2, b_dec_init_tokens=128)
    return sc, tc


def comparable(line: dict) -> dict:
    """A log line without its wall-clock field, NaN made comparable."""
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in line.items() if k != "tokens_per_s"}


class _Crash(Exception):
    pass


def dies_at_batch(n_batch):
    for i, batch in enumerate(make_batches(STEPS)):
        if i == n_batch:
            raise _Crash
        yield batch


def assert_same_weights(a, b):
    for (n1, t1), (n2, t2) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1


@pytest.fixture(scope="module", params=["topk", "codebook"])
def reference(request):
    sc, tc = configs(request.param)
    logs = []
    result = train(sc, tc, make_batches(STEPS), on_log=logs.append)
    assert [line["step"] for line in logs] == list(range(5, STEPS + 1, 5))
    return sc, tc, result.sae, logs


def test_crash_in_the_iterator_resumes_to_the_same_log(reference, tmp_path):
    sc, tc, ref_sae, ref_logs = reference
    logs = []
    with pytest.raises(_Crash):  # dies producing batch 24: after the step-21 checkpoint, one step into the 21-25 window
        train(sc, tc, dies_at_batch(24), on_log=logs.append, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["log_acc"]["n"] == 1
    res = train(sc, tc, make_batches(STEPS), on_log=logs.append, checkpoint_dir=tmp_path)
    assert res.resumed_from_step == 21
    assert [comparable(line) for line in logs] == [comparable(line) for line in ref_logs]
    assert_same_weights(res.sae, ref_sae)


def test_crash_in_on_log_resumes_to_the_same_log(reference, tmp_path):
    """Like ``training_log`` (INSERT OR REPLACE by step): a line logged before the crash but after
    the last checkpoint is logged again by the resumed run, and the one it replaces is the same."""
    sc, tc, ref_sae, ref_logs = reference
    table = {}

    def store_then_crash_at_30(line):
        table[line["step"]] = line
        if line["step"] == 30:  # last checkpoint: step 28, two steps into the 26-30 window
            raise _Crash

    with pytest.raises(_Crash):
        train(sc, tc, make_batches(STEPS), on_log=store_then_crash_at_30, checkpoint_dir=tmp_path)
    resumed = []
    res = train(sc, tc, make_batches(STEPS), on_log=resumed.append, checkpoint_dir=tmp_path)
    assert res.resumed_from_step == 28 and [line["step"] for line in resumed] == [30, 35, 40]
    table.update({line["step"]: line for line in resumed})
    assert [comparable(table[s]) for s in sorted(table)] == [comparable(line) for line in ref_logs]
    assert_same_weights(res.sae, ref_sae)


def test_a_checkpoint_without_the_log_sums_still_resumes(reference, tmp_path):
    sc, tc, ref_sae, ref_logs = reference
    with pytest.raises(_Crash):
        train(sc, tc, dies_at_batch(24), checkpoint_dir=tmp_path)
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    del meta["log_acc"]  # as written before the sums were saved
    state.write_text(json.dumps(meta))
    logs = []
    res = train(sc, tc, make_batches(STEPS), on_log=logs.append, checkpoint_dir=tmp_path)
    assert res.resumed_from_step == 21 and [line["step"] for line in logs] == list(range(25, STEPS + 1, 5))
    # the old behaviour: the first line averages steps 22-25 only; the later ones are unaffected
    assert comparable(logs[0]) != comparable(ref_logs[4])
    assert [comparable(line) for line in logs[1:]] == [comparable(line) for line in ref_logs[5:]]
    assert_same_weights(res.sae, ref_sae)


def test_training_log_table_after_a_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Through ``workbench.training.train_sae``: a crash (raised from the trainer's log callback
    after a row is written, between two checkpoints), the same call again, and the table's rows
    equal a clean run's."""
    from workbench import training
    from workbench.cli import main
    from workbench.workspace import Workspace

    db = tmp_path / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "4096", "--ctx", "64", "--db", str(db)]) == 0
    sae_fields = {"arch": "topk", "width": 64, "k": 4}
    tc = TrainConfig(batch_size=128, total_tokens=128 * 24, warmup_steps=2, log_every=5, checkpoint_every=7,
                     progress_bar=False)
    real_train = saes.train

    def crashing_train(*args, on_log, **kwargs):
        def log(line):
            on_log(line)  # the row for step 15 is written (autocommit), then the process "dies"
            if line["step"] == 15:
                raise _Crash

        return real_train(*args, on_log=log, **kwargs)

    with Workspace(db) as ws:
        monkeypatch.setattr(training.saes, "train", crashing_train)
        with pytest.raises(_Crash):  # last checkpoint at step 14
            training.train_sae(ws, HOOK, sae_fields, tc, name="resumed")
        monkeypatch.setattr(training.saes, "train", real_train)
        resumed = training.train_sae(ws, HOOK, sae_fields, tc, name="resumed")
        clean = training.train_sae(ws, HOOK, sae_fields, tc, name="clean")
        assert resumed.resumed_from_step == 14 and clean.resumed_from_step == 0

        def table(sae_id):
            return [(step, tokens, comparable(json.loads(metrics))) for step, tokens, metrics in ws.query(
                "SELECT step, tokens, metrics FROM training_log WHERE sae_id = ? ORDER BY step", [sae_id])]

        assert [row[0] for row in table(clean.sae_id)] == [5, 10, 15, 20, 24]
        assert table(resumed.sae_id) == table(clean.sae_id)
    assert_same_weights(saes.load_sae(resumed.path), saes.load_sae(clean.path))
