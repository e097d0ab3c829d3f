"""``workbench steer``: check the spec before the model loads, generate both continuations, print the effect.

    spec  = --spec FILE, or one intervention from --sae/--feature/--method/--strength/--unit/--hook
    print   baseline and steered continuations (same seed), then ``measure`` on the prompt
            (Δ log P of the top logit-effect tokens, feature activation) and KL/JS on neutral text
            (held-out cached contexts of the hook when a workspace is given)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.options import add_db, add_device, add_fields, config_from, integer, number
from workbench.errors import WorkbenchError
from workbench.steering import (
    CODE_MODES,
    METHODS,
    UNITS,
    Generation,
    Intervention,
    SteeringError,
    SteeringSpec,
    check_spec,
    generate,
    measure,
    neutral_from_workspace,
)

EXAMPLE = 'workbench steer --db workspaces/default.duckdb --sae demo-topk --feature 464 --strength 4 --prompt "The"'
INTERVENTION_FLAGS = {"source": "--sae", "index": "--feature"}


def configure(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=run_steer_command)
    add_db(p, required=False, help="workspace: SAE names, feature units, neutral text and the model")
    add_fields(p, Intervention, skip=("vector",), rename=INTERVENTION_FLAGS,
               choices={"method": METHODS, "unit": UNITS, "code_mode": CODE_MODES})
    p.add_argument("--spec", type=Path, default=None, help="steering spec JSON file (replaces the intervention flags)")
    p.add_argument("--prompt", required=True, help="text to continue, with and without steering")
    p.add_argument("--max-new-tokens", type=integer, default=40, help="tokens generated per continuation")
    p.add_argument("--temperature", type=number, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=integer, default=0, help="sampling seed, the same for both continuations")
    p.add_argument("--model", default=None, help="default: the model that cached the hook, else smollm2-135m")
    add_device(p)


def spec_from_args(args) -> SteeringSpec:
    """The spec of ``workbench steer``: ``--spec FILE`` or one intervention from the flags."""
    if args.spec is not None:
        return SteeringSpec.load(args.spec)
    if args.source is None or args.index is None:
        raise SteeringError("give --sae and --feature (or a --spec file)")
    return SteeringSpec((config_from(args, Intervention),))


def run_steer_command(args) -> None:
    """``workbench steer``: check the spec, load the model, print both generations and the effect."""
    from workbench.models import load_model
    from workbench.workspace import Workspace

    spec = spec_from_args(args)
    if not spec.interventions:
        raise SteeringError("the steering spec has no interventions")
    if args.max_new_tokens <= 0:
        raise SteeringError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    ws = Workspace(args.db, read_only=True) if args.db is not None else None
    try:
        checked = check_spec(spec, ws)  # SAEs, indices, units: before the model loads
        hook = checked[0][2]
        model_name = args.model
        if model_name is None and ws is not None:
            rows = ws.query("SELECT r.model FROM runs r JOIN run_hooks h USING (run_id) WHERE h.hook = ? ORDER BY r.run_id", [hook])
            model_name = rows[0][0] if rows else None
        loaded = load_model(model_name or "smollm2-135m", device=args.device, dtype=args.model_dtype)
        gen = generate(loaded.model, args.prompt, spec, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       temperature=args.temperature, ws=ws)
        neutral = None
        if ws is not None:
            try:
                neutral = neutral_from_workspace(ws, hook)
            except WorkbenchError:
                neutral = None
        effect = measure(loaded.model, spec, [args.prompt], neutral, ws=ws)
    finally:
        if ws is not None:
            ws.close()
    print(format_report(spec, gen, effect, temperature=args.temperature, seed=args.seed))


def format_report(spec: SteeringSpec, gen: Generation, effect: dict, *, temperature: float, seed: int) -> str:
    sampling = "greedy" if temperature == 0 else f"temperature {temperature:g}, seed {seed}"
    hooks = [row["hook"] for row in effect["interventions"]]
    lines = [f"steering ({sampling}):"] + [f"  {iv.describe(hook)}" for iv, hook in zip(spec.interventions, hooks)]
    lines += [f"prompt:   {gen.prompt!r}", f"baseline: {gen.baseline!r}", f"steered:  {gen.steered!r}",
              "effect on the prompt (teacher-forced, baseline → steered):"]
    for row in effect["interventions"]:
        name = f"feature {row['index']}" if row["index"] is not None else "vector"
        if row["source"] != "vector":
            lines.append(f"  {name} activation at {row['hook']}: {row['feature_act_baseline']:.3f} → {row['feature_act_steered']:.3f}")
        tokens = ", ".join(repr(t) for t in row["top_tokens"])
        lines.append(f"  log P(top tokens of {name}): {row['logprob_top_baseline']:.3f} → {row['logprob_top_steered']:.3f} "
                     f"(Δ {row['delta_logprob_top']:+.3f}); tokens: {tokens}")
    lines.append(f"side effect: KL(baseline ‖ steered) on neutral text = {effect['kl_neutral']:.4f} nats/token, "
                 f"JS = {effect['js_neutral']:.4f} nats/token ({effect['n_neutral_positions']} positions)")
    return "\n".join(lines)
