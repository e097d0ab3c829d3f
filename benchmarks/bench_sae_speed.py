"""Side-by-side SAE training speed on this CPU: the project's TopK vs sae-lens's TopK vs eai-sparsify.

Same process, same data, same steps, same lr, interleaved step by step (each step of
`saes.train` is followed by one step of each competitor) so the shared CPU's load hits all alike:
d_in 576, width 4608, k 32, batch 4096 (defaults).
Reports steady-state tokens/s (first 2 steps and data-dependent init excluded), the FVU each reaches
on held-out tokens after the same tokens, the ratios, and
the project's Feature Choice / Mutual Choice step time relative to its TopK.

    python benchmarks/bench_sae_speed.py [--steps 30] [--repeats 1] [--json out.json]

Data: synthetic activations with known sparse features in superposition (saes.synthetic),
generated once and cycled, so every competitor sees identical batches.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from saes import SAEConfig, TrainConfig, build, train
from saes.synthetic import SyntheticFeatures


def make_data(d, n_feat, k_true, batch, n_batches, seed=0):
    gen = SyntheticFeatures(d=d, n_features=n_feat, k=k_true, noise=0.05, seed=seed)
    return list(gen.batches(n_batches, batch)), next(gen.batches(1, batch, seed=seed + 12345))


WARM = 2  # steps excluded from timing (allocator / first-call warm-up; also excludes our data-dependent init)


def steady(stamps):
    """Seconds per step over the steady-state steps (after WARM), scaled back to all steps."""
    per_step = (stamps[-1] - stamps[WARM - 1]) / (len(stamps) - WARM)
    return per_step * len(stamps)


def cycle(batches, steps):
    for i in range(steps):
        yield batches[i % len(batches)]


@torch.no_grad()
def fvu_of(fn, x):
    xh = fn(x)
    return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


class OursStepper:
    """The trainer's core step on the module (used for the FC / MC vs TopK comparison)."""

    def __init__(self, arch, cfg, lr, bf16, sample):
        torch.manual_seed(0)
        self.sae = build(SAEConfig(d_in=cfg.d, width=cfg.width, k=cfg.k, arch=arch))
        self.sae.init_from_data(sample)
        self.sae.train()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, fused=True)
        self.dead = torch.zeros(cfg.width, dtype=torch.bool)
        self.bf16 = bf16

    def step(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.sae(x, self.dead)
        loss = out.losses["nmse"] + out.losses["aux"] / 32
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grad()
        self.opt.step()
        self.sae.normalize_decoder()
        self.sae.update_running_stats(out.feature_counts, x.shape[0], out.threshold_stat, True)

    def recon(self, x):
        self.sae.eval()
        return self.sae.decode(self.sae.encode(x))


class SaeLensStepper:
    def __init__(self, cfg, lr):
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        torch.manual_seed(0)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg.d, d_sae=cfg.width, k=cfg.k))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.dead = torch.zeros(cfg.width, dtype=torch.bool)
        self.i = 0

    def step(self, x):
        from sae_lens.saes.sae import TrainStepInput

        out = self.sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=self.dead,
                                                            n_training_steps=self.i, is_logging_step=False))
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.i += 1

    def recon(self, x):
        self.sae.eval()
        return self.sae.decode(self.sae.encode(x))


class SparsifyStepper:
    def __init__(self, cfg, lr):
        import os

        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        self.sae = SparseCoder(cfg.d, SparseCoderConfig(num_latents=cfg.width, k=cfg.k))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.dead = torch.zeros(cfg.width, dtype=torch.bool)

    def step(self, x):
        out = self.sae(x, dead_mask=self.dead)
        loss = out.fvu + out.auxk_loss / 32
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.sae.set_decoder_norm_to_unit_norm()

    def recon(self, x):
        return self.sae(x).sae_out


def lockstep_vs_trainer(cfg, batches, lr, held, others):
    """Run saes.train (TopK, bf16) and the other steppers step-interleaved on the same batches.

    Interleaving per step gives every competitor the same share of the (noisy, shared) CPU.
    Our step time = wall time between two batch requests of the trainer minus the others' steps.
    """
    times = {"ours_topk_bf16 (saes.train)": 0.0, **{n: 0.0 for n in others}}
    clock = {"last": None}

    def batches_iter():
        for i in range(cfg.steps):
            now = time.perf_counter()
            if clock["last"] is not None and i > WARM:
                times["ours_topk_bf16 (saes.train)"] += now - clock["last"]
            x = batches[i % len(batches)]
            for name, st in others.items():
                t0 = time.perf_counter()
                st.step(x)
                if i >= WARM:
                    times[name] += time.perf_counter() - t0
            clock["last"] = time.perf_counter()
            yield x

    sc = SAEConfig(d_in=cfg.d, width=cfg.width, k=cfg.k, arch="topk")
    tc = TrainConfig(lr=lr, batch_size=cfg.batch, total_tokens=cfg.batch * cfg.steps, warmup_steps=0, decay_fraction=0.0,
                     progress_bar=False, bf16_autocast=True, log_every=10**9, b_dec_init_tokens=cfg.batch)
    res = train(sc, tc, batches_iter())
    times["ours_topk_bf16 (saes.train)"] += time.perf_counter() - clock["last"]
    n_timed = cfg.steps - WARM
    fvus = {"ours_topk_bf16 (saes.train)": fvu_of(lambda x: res.sae.decode(res.sae.encode(x)), held)}
    for name, st in others.items():
        fvus[name] = fvu_of(st.recon, held)
    return {n: (times[n] / n_timed, fvus[n]) for n in times}


def lockstep(steppers, batches, steps, held):
    times = {n: 0.0 for n in steppers}
    for i in range(steps):
        x = batches[i % len(batches)]
        for name, st in steppers.items():
            t0 = time.perf_counter()
            st.step(x)
            if i >= WARM:
                times[name] += time.perf_counter() - t0
    return {n: (times[n] / (steps - WARM), fvu_of(st.recon, held)) for n, st in steppers.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1, help="rounds; the median step time per competitor is reported")
    p.add_argument("--skip", default="", help="comma-separated: sae_lens, sparsify, fp32, variants")
    p.add_argument("--json", default=None)
    cfg = p.parse_args(argv)
    skip = set(filter(None, cfg.skip.split(",")))
    lr = 2e-4 / math.sqrt(cfg.width / 2**14)
    batches, held = make_data(cfg.d, 4 * cfg.width, cfg.k // 2, cfg.batch, 4)
    tok = cfg.batch
    print(f"threads={torch.get_num_threads()} d_in={cfg.d} width={cfg.width} k={cfg.k} batch={cfg.batch} "
          f"steps={cfg.steps} (first {WARM} untimed) lr={lr:.2e}")
    rows: dict[str, dict[str, float]] = {}
    for r in range(cfg.repeats):
        others = {}
        if "sae_lens" not in skip:
            others["sae_lens_topk"] = SaeLensStepper(cfg, lr)
        if "sparsify" not in skip:
            others["sparsify_topk"] = SparsifyStepper(cfg, lr)
        if "fp32" not in skip:
            others["ours_topk_fp32"] = OursStepper("topk", cfg, lr, False, batches[0])
        res = lockstep_vs_trainer(cfg, batches, lr, held, others)
        if "variants" not in skip:
            v = {f"ours_{a}_bf16 (module)": OursStepper(a, cfg, lr, True, batches[0]) for a in ("topk", "feature_choice", "mutual_choice")}
            res.update(lockstep(v, batches, cfg.steps, held))
        for n, (sec, fvu) in res.items():
            rows.setdefault(n, {"s_per_step": [], "fvu": fvu})["s_per_step"].append(sec)
            print(f"round {r}: {n:34s} {tok / sec:9.0f} tok/s  FVU {fvu:.4f}", flush=True)
    for n, row in rows.items():
        row["s_per_step"] = sorted(row["s_per_step"])[len(row["s_per_step"]) // 2]  # median over rounds
        row["tokens_per_s"] = tok / row["s_per_step"]
    print(f"\n{'competitor':34s} {'tok/s':>9s} {'FVU':>8s}")
    for n, row in rows.items():
        print(f"{n:34s} {row['tokens_per_s']:9.0f} {row['fvu']:8.4f}")
    ratios = {}
    ours = rows["ours_topk_bf16 (saes.train)"]
    for other in ("sae_lens_topk", "sparsify_topk", "ours_topk_fp32"):
        if other in rows:
            ratios[f"tokens/s ours_topk_bf16 / {other}"] = ours["tokens_per_s"] / rows[other]["tokens_per_s"]
    base = rows.get("ours_topk_bf16 (module)")
    if base:
        for a in ("feature_choice", "mutual_choice"):
            ratios[f"step time ours_{a} / ours_topk (bf16)"] = rows[f"ours_{a}_bf16 (module)"]["s_per_step"] / base["s_per_step"]
    for k_, v in ratios.items():
        print(f"{k_:55s} {v:6.2f}x")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": vars(cfg), "results": rows, "ratios": ratios}, f, indent=2)
    return rows, ratios


if __name__ == "__main__":
    main()
