"""Train a small Mixtral-architecture MoE offline, so the MoE probes have a model with learned routing.

    python benchmarks/train_tiny_moe.py --out runs/tiny-moe [--tokens 2000000] [--d-model 128] [--layers 4]
        [--experts 8] [--k 2] [--context 128] [--aux-coef 0.01] [--activation silu] [--dtype bf16] [--threads 1]

The same machinery as the sparsity series (workbench.tinylm): a byte-level BPE and BOS-prefixed
rows of the corpus (``prepare_token_data``, snapshot in OUT/data), then ``train_tiny_lm`` with
``n_experts > 0`` (checkpoints, manifest and held-out rows in OUT/model). Rerunning with the same
arguments resumes from the newest checkpoint; a finished run only reports. The objective is
next-token CE + aux_coef · LB with the Switch/Mixtral load-balancing loss

    LB = (1/L) Σ_l E · Σ_e f_{l,e} · P_{l,e},   f_{l,e} = share of layer l's top-k slots routed to e,
                                            P_{l,e} = layer l's mean router probability of e

(≈ k when balanced, ≈ E when collapsed; per layer, not pooled over layers; see workbench/tinylm/train.py).

Prints each checkpoint's training CE, LB and held-out CE, the training tokens/s and wall time of
this invocation, and the routing balance of the final model on held-out rows, read through the
workbench (``load_model`` + ``probes.routing.recorded_routing``): per layer, the fraction of
token slots per expert (balanced = 1/E), max/min load and the normalised entropy of the load
(1 = perfectly balanced). The same numbers go to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (data snapshot, checkpoints, summary.json)")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--max-documents", type=int, default=None, help="use only the corpus's first N documents (smoke runs)")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-expert", type=int, default=None, help="each expert's FFN width (default 4 * d_model)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2, help="experts per token")
    parser.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef, the weight of LB")
    parser.add_argument("--activation", default="silu", help="expert FFN activation (silu = SwiGLU, as Mixtral)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--checkpoints", type=int, default=6, help="log-spaced checkpoints")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows for each checkpoint's loss")
    parser.add_argument("--balance-rows", type=int, default=256, help="held-out rows for the routing balance")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def routing_balance(checkpoint_dir: Path, rows: torch.Tensor, batch_size: int) -> list[dict]:
    """Per MoE layer of the checkpoint loaded through the bridge: the share of top-k slots per expert on ``rows``."""
    from probes.routing import recorded_routing, router_spec
    from workbench.models import load_model

    model = load_model(str(checkpoint_dir), device="cpu").model
    spec = router_spec(model)
    with torch.no_grad(), recorded_routing(model) as recorder:
        for start in range(0, len(rows), batch_size):
            model(rows[start : start + batch_size])  # (B, context, vocab), discarded
    out = []
    for layer in recorder.layers:
        indices = recorder.routing(layer).indices  # (n, k)
        load = torch.bincount(indices.reshape(-1), minlength=spec.n_experts).double()  # (E,)
        share = load / load.sum()  # (E,), balanced = 1/E
        nonzero = share[share > 0]
        entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(spec.n_experts)
        out.append({"layer": layer, "tokens": int(indices.shape[0]), "share": [round(float(s), 4) for s in share],
                    "max_over_balanced": float(share.max()) * spec.n_experts,
                    "min_over_balanced": float(share.min()) * spec.n_experts, "entropy_normalised": entropy})
    return out


def run(args: argparse.Namespace, log=print) -> dict:
    from workbench.data import load_corpus
    from workbench.tinylm import TinyLMConfig, prepare_token_data, read_manifest, train_tiny_lm

    started = time.perf_counter()
    cfg = TinyLMConfig(activation=args.activation, d_model=args.d_model, n_layers=args.layers, d_mlp=args.d_expert,
                       n_experts=args.experts, experts_per_token=args.k, router_aux_loss_coef=args.aux_coef,
                       context=args.context, vocab_size=args.vocab, batch_size=args.batch, lr=args.lr,
                       total_tokens=args.tokens, n_checkpoints=args.checkpoints, dtype=args.dtype,
                       eval_rows=args.eval_rows, seed=args.seed)
    corpus = load_corpus(args.corpus, max_documents=args.max_documents)
    data_dir = args.out / ("data" if args.max_documents is None else f"data-first{args.max_documents}")
    data = prepare_token_data(corpus, data_dir, vocab_size=cfg.vocab_size, context=cfg.context, seed=cfg.seed)
    model_dir = args.out / "model"
    log(f"{args.corpus}: {data.info['train_tokens']:,} training tokens in {len(data.train):,} rows, "
        f"{len(data.heldout):,} held-out rows; tokenizer {len(data.tokenizer)} tokens ({time.perf_counter() - started:.0f} s)")
    log(f"Mixtral d{cfg.d_model} L{cfg.n_layers} E{cfg.n_experts} k{cfg.experts_per_token} expert width {cfg.mlp_width}: "
        f"{cfg.non_embedding_params:,} non-embedding parameters, {cfg.active_non_embedding_params:,} active per token; "
        f"{cfg.total_steps:,} steps of {cfg.tokens_per_step:,} tokens ({cfg.dtype}, {args.threads} thread(s))")

    before = read_manifest(model_dir)["checkpoints"] if (model_dir / "manifest.json").is_file() else []
    tokens_before = before[-1]["tokens"] if before else 0
    t0 = time.perf_counter()
    checkpoints = train_tiny_lm(cfg, data, model_dir, progress=not args.no_progress, num_threads=args.threads)
    train_s = time.perf_counter() - t0
    records = read_manifest(model_dir)["checkpoints"]
    for rec in records:
        log(f"  {rec['tokens']:>10,} tokens: train CE {rec['train_loss']:.3f}, LB {rec['router_aux_loss']:.3f}, "
            f"held-out CE {rec['heldout_loss']:.3f}, {rec['elapsed_s']:.0f} s")
    trained_now = checkpoints[-1].tokens - tokens_before
    tokens_per_s = trained_now / train_s if trained_now else None
    last = records[-1]
    summary = {
        "config": cfg.to_dict(),
        "non_embedding_params": cfg.non_embedding_params,
        "active_non_embedding_params": cfg.active_non_embedding_params,
        "checkpoint": str(checkpoints[-1].path),
        "tokens": last["tokens"],
        "train_loss": last["train_loss"],
        "router_aux_loss": last["router_aux_loss"],
        "heldout_loss": last["heldout_loss"],
        "training_elapsed_s": last["elapsed_s"],
        "tokens_per_s_this_run": tokens_per_s,
        "tokens_per_s_overall": last["tokens"] / last["elapsed_s"],
        "threads": args.threads,
    }
    with torch.no_grad():
        summary["balance"] = routing_balance(checkpoints[-1].path, data.heldout[: args.balance_rows], cfg.batch_size)
    summary["wall_s"] = time.perf_counter() - started
    speed = f"{tokens_per_s:,.0f} tokens/s this run" if tokens_per_s else "already trained"
    log(f"final: {last['tokens']:,} tokens, train CE {last['train_loss']:.3f}, held-out CE {last['heldout_loss']:.3f} "
        f"(perplexity {math.exp(last['heldout_loss']):.1f}); {speed}; "
        f"{summary['tokens_per_s_overall']:,.0f} tokens/s over the whole training ({last['elapsed_s']:.0f} s)")
    balance_tokens = summary["balance"][0]["tokens"] if summary["balance"] else 0
    log(f"routing on {balance_tokens:,} held-out tokens: share of top-{cfg.experts_per_token} slots per expert "
        f"(balanced = {1 / cfg.n_experts:.3f})")
    for b in summary["balance"]:
        log(f"  layer {b['layer']}: {' '.join(f'{s:.3f}' for s in b['share'])}  max/balanced {b['max_over_balanced']:.2f}, "
            f"min/balanced {b['min_over_balanced']:.2f}, entropy/log E {b['entropy_normalised']:.3f}")
    log(f"wall time {summary['wall_s']:.0f} s")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from workbench.cli import quiet_third_party

    quiet_third_party()
    run(args, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
