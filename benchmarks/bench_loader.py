"""The data path end to end on this machine: loader vs DuckDB fetch vs the CPU trainer, writer vs forward.

    python benchmarks/bench_loader.py [--tokens-576 262144] [--tokens-2304 65536] [--batch 4096]
        [--repeats 2] [--train-steps 6] [--lm-width 576] [--lm-layers 4] [--cache-tokens 32768] [--no-zstd]

One process, every competitor side by side on the same data, best of ``--repeats`` (alternating),
ratios printed (absolute figures on a shared machine are noisy; the ratios are what to read):

- synthetic workspaces (random float16 activations, ctx 128, no model) written by the caching
  job's own writer (``workbench.cache_writer.CacheWriter``, the caching job's settings): its rate
  at d 2304 is the "writer alone" figure, next to the writer this change replaced (one
  transaction per 16 contexts, ``torch.isfinite``, DuckDB's default ZSTD blob storage);
- loader rows/s into CPU float32 (``iter_activations``, batches of ``--batch``) at d 576 and d 2304,
  against the DuckDB fetch alone (the loader's own reads of the same shuffled blocks to Arrow,
  nothing else) and the first implementation (float32 copies on the host, its query filtered by
  hook); at d 576 also on a ZSTD-stored copy (``--no-zstd`` skips it);
- the CPU trainer's consumption (``saes.train``, TopK width 9,216 = 16 x 576, k 32, batches from
  memory) at both widths, and the loader / trainer ratio;
- the caching job through a random Llama (``--lm-width``, ``--lm-layers``, SmolLM2's tokenizer; the
  hook is the second-to-last block so the forward is truncated) against its bare truncated
  Hugging Face forward and the TransformerBridge forward without writes: the caching overhead,
  for the whole job and while the model runs (the last commit and the checkpoint come once per job).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from bench_cache import best_of  # same folder: benchmarks run as scripts

CTX = 128
HOOK = "blocks.0.hook_resid_post"


class Ctx(NamedTuple):
    """What the writer needs of a context (``workbench.data`` gives the real ones)."""

    index: int
    token_ids: list[int]
    doc_ids: list[int]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def new_run(ws, d: int, n_contexts: int, ctx: int = CTX) -> int:
    """The rows `ActivationCacher` makes before its first batch: a corpus, a run and its hook."""
    ws.con.execute("INSERT INTO corpora (spec, n_documents) VALUES (?, 0) ON CONFLICT DO NOTHING", [f"synthetic#{d}"])
    corpus_id = ws.query("SELECT corpus_id FROM corpora WHERE spec = ?", [f"synthetic#{d}"])[0][0]
    run_id = ws.query("""INSERT INTO runs (kind, model, corpus_id, ctx_len, seed, n_contexts_target, dtype, config, status)
                         VALUES ('cache', 'synthetic', ?, ?, 0, ?, 'float16', ?::JSON, 'done') RETURNING run_id""",
                      [corpus_id, ctx, n_contexts, f'{{"d": {d}, "ctx": {ctx}}}'])[0][0]
    ws.con.execute("INSERT INTO run_hooks VALUES (?, ?, ?)", [run_id, HOOK, d])
    return run_id


def synthetic_batches(d: int, n_contexts: int, ctx: int = CTX, batch: int = 16, pool: int = 4, seed: int = 0):
    """Float32 CPU activations [batch, ctx, d] as a CPU forward leaves them (a pool, cycled)."""
    gen = torch.Generator().manual_seed(seed)
    acts = [torch.randn(batch, ctx, d, generator=gen) for _ in range(pool)]
    tokens = [0] * ctx
    for k, start in enumerate(range(0, n_contexts, batch)):
        n = min(batch, n_contexts - start)
        yield [Ctx(i, tokens, [-1] * ctx) for i in range(start, start + n)], acts[k % pool][:n]


def write_workspace(path: Path, d: int, n_contexts: int, ctx: int = CTX, *, bulk: bool = True) -> float:
    """Fill a workspace through the caching writer; seconds from the first batch to the last commit."""
    from workbench.cache_writer import CacheWriter, DuckDBSink, HostBatch
    from workbench.storage import bulk_blob_settings, insert_arrow
    from workbench.workspace import Workspace

    with Workspace(path) as ws:
        run_id = new_run(ws, d, n_contexts, ctx)
        batches = list(synthetic_batches(d, n_contexts, ctx))
        settings = bulk_blob_settings(ws.con) if bulk else _no_settings()
        start = time.perf_counter()
        with settings:
            sink = DuckDBSink(ws.con, run_id=run_id, corpus_id=1, corpus=None, dtype="float16", ctx_len=ctx, commit_contexts=128,
                              stored_docs=set(), insert=insert_arrow)
            with CacheWriter(sink) as writer:
                for contexts, acts in batches:
                    writer.put(HostBatch(contexts, {HOOK: acts}))
            elapsed = time.perf_counter() - start
    return elapsed


def synthetic_workspace(path: Path, *, d: int, tokens: int, ctx: int = CTX) -> Path:
    """A workspace holding ``tokens`` random float16 activations of width ``d`` at ``HOOK`` (written by
    the caching writer, as ``workbench cache`` writes them); returns ``path``."""
    write_workspace(path, d, -(-tokens // ctx), ctx)
    return path


class _no_settings:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def first_writer(path: Path, d: int, n_contexts: int) -> float:
    """The writer this change replaced: per batch of 16 contexts, float16 + ``torch.isfinite`` + one
    bytes object per blob, then its own transaction, on DuckDB's default settings."""
    from workbench.cache_writer import batch_tables
    from workbench.storage import insert_arrow
    from workbench.workspace import Workspace

    with Workspace(path) as ws:
        run_id = new_run(ws, d, n_contexts)
        batches = list(synthetic_batches(d, n_contexts))
        start = time.perf_counter()
        for contexts, acts in batches:
            stored = acts.to(torch.float16)
            assert torch.isfinite(stored).all()
            bits = stored.view(torch.int16).numpy().reshape(len(contexts), -1)
            tables = batch_tables(run_id, 1, contexts, {}, CTX, None, set())
            tables["activations"] = pa.table({"run_id": np.full(len(contexts), run_id, np.int32), "hook": [HOOK] * len(contexts),
                                              "context_id": tables["contexts"].column("context_id"),
                                              "data": [bits[i].tobytes() for i in range(len(contexts))]})
            with ws.transaction() as con:
                for name, rows in tables.items():
                    insert_arrow(con, name, rows)
        return time.perf_counter() - start


def first_implementation(ws, hook: str, batch_size: int, buffer_tokens: int = 65_536):
    """``iter_activations`` before this change: float32 copies on the host, shuffled there, no thread."""
    from workbench.activations import context_ids, read_contexts

    order = context_ids(ws, hook)
    random.Random(0).shuffle(order)
    generator, leftover = torch.Generator().manual_seed(0), None
    for start in range(0, len(order), buffer_tokens // CTX):
        acts = read_contexts(ws, hook, order[start : start + buffer_tokens // CTX])[:, 1:]  # [n, L - 1, d]
        flat = acts.reshape(-1, acts.shape[-1])
        flat = flat[torch.randperm(flat.shape[0], generator=generator)]
        if leftover is not None:
            flat = torch.cat([leftover, flat])
        n_full = flat.shape[0] // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield flat[i : i + batch_size]
        leftover = flat[n_full:]


def loader_rates(path: Path, batch: int, repeats: int) -> dict[str, float]:
    """rows/s of: the loader's DuckDB reads alone (its blocks, in its order, to Arrow), the loader,
    the first implementation."""
    from workbench.activations import _read_stored, _row_ids, _run_layout, context_ids, iter_activations
    from workbench.loader import block_order
    from workbench.workspace import Workspace

    with Workspace(path, read_only=True) as ws:
        run_id = ws.resolve_hook_run(HOOK)
        ids = context_ids(ws, HOOK, split="all")
        ctx, d, dtype = _run_layout(ws, run_id, HOOK)
        rows = len(ids) * (ctx - 1)

        def fetch() -> None:
            row_ids = _row_ids(ws.con, run_id, HOOK)
            for _, chunk in block_order(ids, seed=0, epochs=1, per_read=65_536 // ctx):
                _read_stored(ws.con, HOOK, chunk, row_ids, ctx, d, dtype)

        def loader() -> None:
            for _ in iter_activations(ws, HOOK, batch, split="all"):
                pass

        def first() -> None:
            for _ in first_implementation(ws, HOOK, batch):
                pass

        times: dict[str, list[float]] = {"fetch": [], "loader": [], "first": []}
        for _ in range(repeats):
            for name, fn in (("fetch", fetch), ("loader", loader), ("first", first)):
                times[name].append(best_of(1, fn))
    return {name: rows / min(t) for name, t in times.items()}


def trainer_rate(d: int, width: int, steps: int, batch: int) -> float:
    """Steady tokens/s of ``saes.train`` (TopK, k 32) on the CPU, batches from memory."""
    import saes

    data = [torch.randn(batch, d, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stamps: list[float] = []

    def batches():
        while True:
            stamps.append(time.perf_counter())
            yield data[len(stamps) % 2]

    warm = 2
    cfg = saes.SAEConfig(d_in=d, width=width, k=32, arch="topk")
    saes.train(cfg, saes.TrainConfig(total_tokens=(steps + warm) * batch, batch_size=batch, warmup_steps=1, progress_bar=False,
                                     log_every=10_000, b_dec_init_tokens=batch), batches(), device="cpu")
    return (len(stamps) - 1 - warm) * batch / (stamps[-1] - stamps[warm])


def random_llama(folder: Path, width: int, layers: int) -> Path:
    """A randomly initialised Llama of the given width and depth with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workbench.models import default_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    heads = max(1, width // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
                         max_position_embeddings=2 * CTX, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def caching_overhead(tmp: Path, width: int, layers: int, n_tokens: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Seconds of: bare truncated HF forward, bridge forward (no writes), the caching job (steady state),
    with the model on ``device`` (each timing waits for the device to finish)."""
    from workbench.caching import ActivationCacher, CacheRequest
    from workbench.data import chunk_and_tokenize, load_corpus
    from workbench.hooks import Capture, attached, stop_layer
    from workbench.models import load_model
    from workbench.workspace import Workspace

    loaded = load_model(str(random_llama(tmp / "lm", width, layers)), device=device)
    on = torch.device(loaded.model.cfg.device)

    def done() -> None:
        if on.type == "cuda":
            torch.cuda.synchronize(on)
    hook = f"blocks.{layers - 2}.hook_resid_post"
    corpus = load_corpus("stdlib")
    n_contexts, batch = n_tokens // CTX, 16
    contexts = list(chunk_and_tokenize(corpus.documents, loaded.tokenizer, CTX, seed=0, max_contexts=n_contexts + batch))[batch:]
    batches = [torch.tensor([c.token_ids for c in contexts[i : i + batch]]) for i in range(0, n_contexts, batch)]
    hf, keep = loaded.model.original_model, layers - 1
    all_layers = hf.model.layers
    stop = stop_layer([hook], layers)
    capture = Capture([hook])

    def bare() -> None:
        hf.model.layers = all_layers[:keep]
        try:
            with torch.inference_mode():
                for b in batches:
                    hf.model(input_ids=b.to(on), use_cache=False)
                done()
        finally:
            hf.model.layers = all_layers

    def bridge() -> None:
        with torch.inference_mode(), attached(loaded.model, capture.hooks()):
            for b in batches:
                loaded.model(b.to(on), stop_at_layer=stop)
            done()

    def job() -> tuple[float, float]:
        path = tmp / f"cache-{time.monotonic_ns()}.duckdb"
        with Workspace(path) as ws:
            def request(tokens: int) -> CacheRequest:
                return CacheRequest(model=str(tmp / "lm"), hooks=(hook,), corpus="stdlib", tokens=tokens, ctx_len=CTX, batch_size=batch)

            ActivationCacher(ws, loaded, corpus, request(batch * CTX)).run(progress=False)  # one-time set-up (vocabulary, run row)
            cacher = ActivationCacher(ws, loaded, corpus, request((batch + n_contexts) * CTX))
            start = time.perf_counter()
            cacher.run(progress=False)
            done()
            return time.perf_counter() - start, cacher.tail_s

    times: dict[str, list[float]] = {"bare": [], "bridge": [], "cache": [], "running": [], "tail": []}
    for _ in range(repeats):
        times["bare"].append(best_of(1, bare))
        times["bridge"].append(best_of(1, bridge))
        whole, tail = job()
        times["cache"].append(whole)
        times["running"].append(whole - tail)
        times["tail"].append(tail)
    return {name: min(t) for name, t in times.items()} | {"tokens": n_contexts * CTX, "hook": hook}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-576", type=int, default=262_144, help="tokens of the d 576 workspace")
    parser.add_argument("--tokens-2304", type=int, default=65_536, help="tokens of the d 2304 workspace")
    parser.add_argument("--batch", type=int, default=4096, help="loader and trainer batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=6, help="timed trainer steps (after 2 warm-up steps)")
    parser.add_argument("--lm-width", type=int, default=576)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--cache-tokens", type=int, default=32_768, help="tokens through the caching job per repeat")
    parser.add_argument("--first-writer-tokens", type=int, default=16_384, help="tokens through the replaced writer at d 2304")
    parser.add_argument("--no-zstd", action="store_true", help="skip the ZSTD-stored d 576 comparison")
    args = parser.parse_args()

    from workbench.cli import quiet_third_party

    quiet_third_party()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        n576, n2304 = args.tokens_576 // CTX, args.tokens_2304 // CTX
        w576 = write_workspace(tmp / "d576.duckdb", 576, n576)
        w2304 = write_workspace(tmp / "d2304.duckdb", 2304, n2304)
        old2304 = first_writer(tmp / "first-writer.duckdb", 2304, args.first_writer_tokens // CTX)
        new, old = n2304 * CTX / w2304, args.first_writer_tokens // CTX * CTX / old2304
        print("caching writer alone (float32 CPU activations -> float16 rows, committed; 16 contexts per put):")
        print(f"  d  576: {n576 * CTX / w576:9,.0f} tok/s")
        print(f"  d 2304: {new:9,.0f} tok/s   the replaced writer {old:9,.0f} tok/s  ->  {new / old:.1f}x")

        print(f"loader into CPU float32, batches of {args.batch}, buffer 65,536 tokens, best of {args.repeats} (rows/s):")
        rates = {}
        for d, path in ((576, tmp / "d576.duckdb"), (2304, tmp / "d2304.duckdb")):
            rates[d] = r = loader_rates(path, args.batch, args.repeats)
            print(f"  d {d:4}: loader {r['loader']:9,.0f}   DuckDB fetch alone {r['fetch']:9,.0f}   first implementation "
                  f"{r['first']:9,.0f}   loader/fetch {r['loader'] / r['fetch']:.2f}   loader/first {r['loader'] / r['first']:.1f}x")
        if not args.no_zstd:
            write_workspace(tmp / "d576-zstd.duckdb", 576, n576, bulk=False)
            z = loader_rates(tmp / "d576-zstd.duckdb", args.batch, 1)
            print(f"  d  576 on ZSTD blobs (DuckDB's default): loader {z['loader']:9,.0f}   fetch {z['fetch']:9,.0f}   first "
                  f"{z['first']:9,.0f}   (uncompressed fetch / ZSTD fetch {rates[576]['fetch'] / z['fetch']:.1f}x)")

        for d in (576, 2304):
            t = trainer_rate(d, 16 * 576, args.train_steps, args.batch)
            print(f"CPU trainer (TopK width {16 * 576}, k 32, d {d}, batch {args.batch}): {t:9,.0f} tok/s   "
                  f"loader/trainer {rates[d]['loader'] / t:.1f}x")

        c = caching_overhead(tmp, args.lm_width, args.lm_layers, args.cache_tokens, args.repeats)
        print(f"caching job, random Llama width {args.lm_width} x {args.lm_layers} layers, hook {c['hook']} "
              f"({c['tokens']:,} tokens in batches of 16 x {CTX}, best of {args.repeats}):")
        for name in ("bare", "bridge", "cache"):
            print(f"  {name:<7} {c['tokens'] / c[name]:9,.0f} tok/s   {c[name] / c['bare']:.3f}x bare time")
        print(f"  caching overhead over the bare truncated forward {100 * (c['cache'] / c['bare'] - 1):+.1f}% for the whole job, "
              f"{100 * (c['running'] / c['bare'] - 1):+.1f}% while the model runs (over the bridge forward "
              f"{100 * (c['running'] / c['bridge'] - 1):+.1f}%), plus {c['tail']:.2f} s once per job after the last batch "
              "(last commit, checkpoint)")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes share these CPUs)")


if __name__ == "__main__":
    main()
