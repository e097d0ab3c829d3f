"""SAE training on any device, with a step that never waits for the host.

meta      tensors without values: a tensor made on another device, or a value read into Python,
          raises there. A few training steps of every trainable architecture, then encode, decode
          and an eval-mode forward, run on meta (autograd's backward included).
host      steady training steps on the CPU under counters of what would make the host wait for a
          GPU. `host_reads` (tests/conftest.py) counts Python-level reads; it does not see inside
          autograd's backward (the engine does not carry Python function modes), so a dispatch-level
          counter (`DeviceReads`) checks the whole step, backward included. Allowance, besides the
          trainer's one `.tolist()` per log interval:
              every architecture                       0 reads per step
              feature_choice with capacity="zipf"      1 read per step: the largest capacity
          and with the CPU-only fast paths of saes.sparse_ops on (the CPU default; off, the CPU runs
          the code CUDA runs), per step: AuxK's count of eligible latents (every SAE), one numpy
          view where entries are sorted (batchtopk, mutual_choice, feature_choice) and batchtopk /
          mutual_choice's saturated-row count.
gpu       (`-m gpu`, skipped without CUDA) a CUDA step and its gradients against the CPU dense
          reference, training under torch.cuda.set_sync_debug_mode("error"), the CUDA RNG state
          round trip and checkpoints moving between CUDA and the CPU.
"""

import contextlib
import copy
import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saes import SAEConfig, TrainConfig, architecture_names, build, sparse_ops, train
from saes.reference import dense_forward

D, W, K, B = 16, 64, 4, 64
N = 12  # steady steps counted
SAE_ARCHS = [a for a in architecture_names() if a != "codebook"]
CASES = [(a, {}) for a in architecture_names()] + [("feature_choice", {"capacity": "zipf"})]
CASE_IDS = [a + ("-zipf" if kw else "") for a, kw in CASES]
READS_PER_STEP = {"feature_choice-zipf": 1}  # documented in saes/feature_choice.py
FAST_PATH_CALLS_PER_STEP = {  # CPU-only: AuxK's count (saes/base.py), sorts and saturated rows (saes/sparse_ops.py)
    "topk": {"item": 1},
    "batchtopk": {"numpy": 1, "item": 2},
    "mutual_choice": {"numpy": 1, "item": 2},
    "feature_choice": {"numpy": 1, "item": 1},
    "feature_choice-zipf": {"numpy": 1, "item": 1},
}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_batches(n, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, D, generator=g)
    for _ in range(n):
        coef = torch.rand(B, 48, generator=g) * (torch.rand(B, 48, generator=g) < 0.08)
        yield (coef @ dirs + 0.01 * torch.randn(B, D, generator=g)).to(device=device, dtype=dtype)


def configs(arch, steps, log_every, **kw):
    # every code path live: dead latents (AuxK) and under-used ones (aux_zipf), thresholds after warm-up, dead codes
    sc = SAEConfig(d_in=D, width=W, k=K, arch=arch, aux_loss="zipf" if arch == "mutual_choice" else "auxk", dead_code_window=2, **kw)
    tc = TrainConfig(batch_size=B, total_tokens=B * steps, warmup_steps=2, log_every=log_every, progress_bar=False,
                     dead_tokens=B * 2, b_dec_init_tokens=B)
    return sc, tc


@pytest.fixture(params=["device-path", "cpu-fast-paths"])
def path(request, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CPU_FAST_PATHS", request.param == "cpu-fast-paths")
    return request.param


def count_steady_steps(counter, arch, kw):
    """Train 2N steps logging every N; count with `counter` from the log line of step N to that of
    step 2N: steps N+1..2N and the log read of step 2N."""
    sc, tc = configs(arch, 2 * N, N, **kw)
    window = contextlib.ExitStack()

    def on_log(line):
        if line["step"] == N:
            window.enter_context(counter)
        else:
            window.close()

    with window:
        train(sc, tc, make_batches(2 * N), on_log=on_log)
    return counter


class DeviceReads(TorchDispatchMode):
    """Dispatch-level count of the ops that wait for a device (`_local_scalar_dense` is item / float /
    int / bool; data-sized outputs), seen in autograd's backward too."""

    DATA_SIZED = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten.bincount")

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", *self.DATA_SIZED)):
            self.calls[name.split(".")[1]] += 1
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.calls["repeat_interleave without output_size"] += 1
        elif name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 and _has_bool(args[1]):
            self.calls["boolean-mask " + name] += 1
        return func(*args, **kwargs)


def _has_bool(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)


# ----------------------------------------------------------------------------- meta
@pytest.mark.parametrize("arch", architecture_names())
def test_training_steps_on_meta(arch):
    """feature_choice runs with uniform capacities: Zipf capacities read one value per step, which meta cannot give."""
    meta = torch.device("meta")
    sc, tc = configs(arch, 5, 2)
    logs = []
    res = train(sc, tc, make_batches(5, device=meta), device="meta", on_log=logs.append)
    assert res.steps == 5 and res.tokens == 5 * B and [line["step"] for line in logs] == [2, 4, 5]
    sae = res.sae
    assert all(t.device == meta for t in [*sae.parameters(), *sae.buffers()])
    x = torch.empty(10, D, device=meta)
    z = sae.encode(x)
    assert z.shape == (10, W) and z.device == meta
    assert sae.decode(z).shape == (10, D)
    out = sae(x)  # eval mode: the inference form
    assert out.reconstruction.shape == (10, D) and out.latents.to_dense(W).shape == (10, W)


def test_cpu_batches_train_on_meta_and_zipf_capacities_read():
    meta = torch.device("meta")
    sc, tc = configs("topk", 3, 2)
    assert train(sc, tc, make_batches(3), device=meta).sae.W_dec.device == meta  # batches moved to the device
    sc, tc = configs("feature_choice", 3, 2, capacity="zipf")
    with pytest.raises(RuntimeError, match="item"):  # the documented read: the largest capacity
        train(sc, tc, make_batches(3, device=meta), device=meta)


# ----------------------------------------------------------------------------- host reads
@pytest.mark.parametrize("arch,kw", CASES, ids=CASE_IDS)
def test_steady_steps_read_the_host_once_per_log_interval(host_reads, arch, kw, monkeypatch):
    """The code CUDA runs (CPU fast paths off): one `.tolist()` per log interval, plus the documented reads."""
    monkeypatch.setattr(sparse_ops, "CPU_FAST_PATHS", False)
    case = arch + ("-zipf" if kw else "")
    reads = count_steady_steps(host_reads(), arch, kw)
    assert reads.calls == Counter({"tolist": 1, "item": N * READS_PER_STEP.get(case, 0)}), case
    assert reads.count <= 1 + N * READS_PER_STEP.get(case, 0)


@pytest.mark.parametrize("arch,kw", CASES, ids=CASE_IDS)
def test_cpu_fast_paths_read_only_what_they_document(host_reads, arch, kw, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CPU_FAST_PATHS", True)
    case = arch + ("-zipf" if kw else "")
    want = Counter({"tolist": 1, "item": N * READS_PER_STEP.get(case, 0)})
    want.update({name: N * n for name, n in FAST_PATH_CALLS_PER_STEP.get(case, {}).items()})
    assert count_steady_steps(host_reads(), arch, kw).calls == want, case


@pytest.mark.parametrize("arch,kw", CASES, ids=CASE_IDS)
def test_no_step_waits_for_the_device_backward_included(arch, kw, path):
    case = arch + ("-zipf" if kw else "")
    per_step = READS_PER_STEP.get(case, 0) + FAST_PATH_CALLS_PER_STEP.get(case, {}).get("item", 0) * (path == "cpu-fast-paths")
    assert count_steady_steps(DeviceReads(), arch, kw).calls == Counter({"_local_scalar_dense": N * per_step}), case


def test_the_counters_catch_reads(host_reads):
    """The counters above can fail: a float() and a boolean mask are seen by both, a read inside a
    backward by the dispatch-level one only."""

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())

    x = torch.randn(4, requires_grad=True)
    with host_reads() as fn_reads, DeviceReads() as dispatch_reads:
        float(x.detach().sum())
        x.detach()[x.detach() > 0]
        ReadsInBackward.apply(x).sum().backward()
    assert fn_reads.calls == Counter({"__float__": 1, "boolean-mask __getitem__": 1})
    assert dispatch_reads.calls == Counter({"_local_scalar_dense": 2, "boolean-mask aten.index.Tensor": 1})


# ----------------------------------------------------------------------------- CPU: inputs, defaults, state
def test_half_precision_batches_train_like_their_float32_values():
    """Batches in bf16 are converted on the device: the same run as their float32 values, bit for bit."""
    sc, tc = configs("batchtopk", 6, 3)
    a = train(sc, tc, make_batches(6, dtype=torch.bfloat16)).sae
    b = train(sc, tc, (x.float() for x in make_batches(6, dtype=torch.bfloat16))).sae
    for (n1, t1), (n2, t2) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_bf16_autocast_defaults_by_device():
    from saes.devices import autocast_default

    assert TrainConfig().bf16_autocast is None
    assert not autocast_default(torch.device("cpu")) and autocast_default(torch.device("cuda"))
    sc, tc = configs("topk", 4, 2)
    default = train(sc, tc, make_batches(4)).sae
    off = train(sc, dataclasses.replace(tc, bf16_autocast=False), make_batches(4)).sae
    assert torch.equal(default.W_enc, off.W_enc)  # None on the CPU = off


@pytest.mark.parametrize("arch", architecture_names())
def test_device_path_under_bf16_autocast_trains(arch, monkeypatch):
    """What CUDA runs by default (device path, bf16 encoder matmul), here on the CPU."""
    monkeypatch.setattr(sparse_ops, "CPU_FAST_PATHS", False)
    sc, tc = configs(arch, 8, 4)
    logs, ref = [], []
    train(sc, dataclasses.replace(tc, bf16_autocast=True), make_batches(8), on_log=logs.append)
    train(sc, tc, make_batches(8), on_log=ref.append)
    for line, want in zip(logs, ref, strict=True):  # bf16 pre-activations: a few selections may flip
        assert line["fvu"] == pytest.approx(want["fvu"], rel=2e-2) and line["l0"] == pytest.approx(want["l0"], rel=0.2)


def test_threshold_readiness_is_read_until_true_then_remembered(host_reads):
    sae = build(SAEConfig(d_in=D, width=W, k=K, arch="batchtopk"))
    with host_reads() as reads:
        assert not sae.thresholds_ready
    assert reads.count == 1
    sae.update_running_stats(torch.ones(W), 10, torch.tensor(0.5), update_thresholds=True)
    with host_reads() as reads:
        assert sae.thresholds_ready and sae.thresholds_ready
    assert reads.count == 0
    sae.load_state_dict(build(SAEConfig(d_in=D, width=W, k=K, arch="batchtopk")).state_dict())  # an unfitted state
    assert not sae.thresholds_ready


def test_checkpoints_are_refused_on_meta(tmp_path):
    from saes.errors import SAEConfigError

    sc, tc = configs("topk", 2, 2)
    with pytest.raises(SAEConfigError):
        train(sc, tc, make_batches(2, device="meta"), device="meta", checkpoint_dir=tmp_path)


# ----------------------------------------------------------------------------- a step against the dense reference
def step_against_reference(make_sae, arch, device):
    """One forward and backward on `device` against the dense CPU reference, in float64 so both sides
    pick the same latents (float32 kernels of other devices may flip near-ties)."""
    sae = make_sae(arch).double()
    sae.train()
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    aux_mask = torch.arange(128) % 3 == 0

    def loss_of(out):
        return out["nmse"] + 0.5 * out["aux"] + out["recon"].square().mean() * 1e-2

    ref = dense_forward(sae, x, aux_mask)
    ref_grads = torch.autograd.grad(loss_of(ref), [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    moved = copy.deepcopy(sae).to(device)
    out = moved(x.to(device), aux_mask.to(device))
    terms = {"nmse": out.losses["nmse"], "aux": out.losses["aux"], "recon": out.reconstruction}
    grads = torch.autograd.grad(loss_of(terms), [moved.W_enc, moved.b_enc, moved.W_dec, moved.b_dec])
    z = out.latents.to_dense(128).cpu()
    assert torch.equal(z != 0, ref["z"].detach() != 0)  # the same selection
    # float64 sums in other orders (sparse against dense, other kernels): ~1e-15 relative
    torch.testing.assert_close(z, ref["z"].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.reconstruction.cpu(), ref["recon"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.losses["nmse"].cpu(), ref["nmse"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.losses["aux"].cpu(), ref["aux"], rtol=1e-10, atol=1e-12)
    assert float(out.losses["aux"].detach()) > 0
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), rg, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_float64_step_against_reference_on_the_cpu(make_sae, arch, path):
    step_against_reference(make_sae, arch, "cpu")


# ----------------------------------------------------------------------------- gpu
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_cuda_step_and_gradients_match_the_cpu_reference(make_sae, arch):
    step_against_reference(make_sae, arch, "cuda")


@pytest.mark.gpu
@requires_cuda
def test_cuda_codebook_step_matches_the_cpu():
    torch.manual_seed(0)
    cb = build(SAEConfig(d_in=16, width=40, k=3, arch="codebook")).train()
    x = torch.randn(8, 16)
    outs = []
    for module, dev in ((cb, "cpu"), (copy.deepcopy(cb).cuda(), "cuda")):
        out = module(x.to(dev))
        (grad,) = torch.autograd.grad(out.losses["nmse"] + out.losses["codebook_mse"], [module.codebook])
        outs.append((out.latents.indices.sort(1).values.cpu(), out.reconstruction.cpu(), grad.cpu()))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("arch,kw", CASES, ids=CASE_IDS)
def test_cuda_training_never_synchronises(arch, kw):
    """N steady steps (no log line among them) under torch.cuda.set_sync_debug_mode("error"); the
    documented read of Zipf capacities is the one sync that raises."""
    sc, tc = configs(arch, N + 4, 10**6, **kw)
    window = contextlib.ExitStack()

    def batches():
        for i, x in enumerate(make_batches(N + 4)):
            if i == 3:  # start of step 3: init and warm-up done
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                window.callback(torch.cuda.set_sync_debug_mode, "default")
            elif i == N + 3:  # start of step N + 3: steps 3 .. N + 2 ran inside
                window.close()
            yield x

    with window:
        if READS_PER_STEP.get(arch + ("-zipf" if kw else ""), 0):
            with pytest.raises(RuntimeError, match="synchroniz"):
                train(sc, tc, batches(), device="cuda")
        else:
            res = train(sc, tc, batches(), device="cuda")
            assert res.steps == N + 4 and res.sae.W_dec.is_cuda


@pytest.mark.gpu
@requires_cuda
def test_cuda_rng_state_round_trip(tmp_path):
    from safetensors.torch import load_file

    sc, tc = configs("topk", 4, 2)
    train(sc, tc, make_batches(4), device="cuda", checkpoint_dir=tmp_path)
    saved = load_file(str(tmp_path / "checkpoint" / "state.safetensors"))["rng.cuda"]
    assert torch.equal(saved, torch.cuda.get_rng_state())
    torch.cuda.manual_seed(12345)
    torch.rand(100, device="cuda")
    again = train(sc, tc, make_batches(4), device="cuda", checkpoint_dir=tmp_path)  # resumes the finished run
    assert again.resumed_from_step == 4 and torch.equal(torch.cuda.get_rng_state(), saved)


class _Crash(Exception):
    pass


def _dies_at(n, steps):
    for i, x in enumerate(make_batches(steps)):
        if i == n:
            raise _Crash
        yield x


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")])
def test_checkpoints_resume_on_another_device(tmp_path, first, then):
    """A checkpoint written on one device resumes on another; without deterministic algorithms the
    result equals an uninterrupted run within float tolerance (CUDA sums with atomics)."""
    sc, tc = configs("topk", 20, 5)
    tc = dataclasses.replace(tc, checkpoint_every=7, bf16_autocast=False)
    ref_logs = []
    ref = train(sc, tc, make_batches(20), device=first, on_log=ref_logs.append).sae.cpu()
    with pytest.raises(_Crash):
        train(sc, tc, _dies_at(16, 20), device=first, checkpoint_dir=tmp_path)
    logs = []
    res = train(sc, tc, make_batches(20), device=then, checkpoint_dir=tmp_path, on_log=logs.append)
    assert res.resumed_from_step == 14 and res.steps == 20 and res.sae.W_dec.device.type == then
    # six steps on another device: float32 kernels differ by ulps, which may flip a near-tied selection
    torch.testing.assert_close(res.sae.W_dec.cpu(), ref.W_dec, rtol=1e-2, atol=1e-2)
    assert logs[-1]["fvu"] == pytest.approx(ref_logs[-1]["fvu"], rel=1e-2)


def test_auxk_is_skipped_until_a_latent_can_be_dead(monkeypatch):
    """Before dead_tokens tokens were seen no latent can be dead: the trainer passes no aux mask (a
    host count, no read), so AuxK's k_aux gathers start only when they can matter."""
    from saes.base import BaseSAE

    masks = []
    original = BaseSAE.forward

    def recording(self, x, aux_mask=None):
        masks.append(aux_mask is not None)
        return original(self, x, aux_mask)

    monkeypatch.setattr(BaseSAE, "forward", recording)
    sc = SAEConfig(d_in=D, width=W, k=K, arch="topk")
    tc = TrainConfig(batch_size=B, total_tokens=B * 6, warmup_steps=0, progress_bar=False, dead_tokens=B * 3, b_dec_init_tokens=B)
    train(sc, tc, make_batches(6), device="cpu")
    assert masks == [False, False, False, True, True, True]  # tokens seen before the step: 0, B, 2B | 3B, 4B, 5B


def test_cuda_without_an_index_is_the_local_rank_under_torchrun(monkeypatch):
    """Each torchrun rank takes the GPU of its LOCAL_RANK (and makes it current); a named index wins."""
    from saes.devices import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [2, 2]
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(None) == torch.device("cuda", 0)


@pytest.mark.parametrize("spec, phrase", [("gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
                                          ("cuda:x", "device must be"), ("cuda:9", "cuda:9 asked for")])
def test_a_device_that_is_malformed_or_absent_is_one_line(spec, phrase):
    from saes import DeviceError
    from saes.devices import resolve_device

    with pytest.raises(DeviceError, match=phrase):
        resolve_device(spec)
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("meta") == torch.device("meta")
