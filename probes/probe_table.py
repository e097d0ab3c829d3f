"""The text table of a sparse-probing result (`workbench probe` and `moe show`): one line per
task with its sizes, split and test accuracy per source and k, a mean line, the SAE latents
picked at the largest k, and the skipped tasks.
"""

from __future__ import annotations

import numpy as np

from probes.probing import ProbingResult


def format_table(result: ProbingResult) -> str:
    """One line per task: sizes, split, then test accuracy per source and k; a mean line; notices."""
    columns = [("sae", k) for k in result.ks] + [("residual", k) for k in result.ks] + [("full", None)]
    heads = [f"sae@{k}" for k in result.ks] + [f"resid@{k}" for k in result.ks] + ["full"]
    by_key = {(r.task, r.source, None if r.source == "full" else r.k): r for r in result.rows}
    tasks = result.tasks
    width = max([len("task"), len("mean")] + [len(t) for t in tasks])
    lines = [f"sparse probing: SAE '{result.sae}' at {result.hook} (seed {result.seed}); test accuracy",
             f"{'task':<{width}}  {'train':>5}  {'test':>4}  {'split':<10}  " + "  ".join(f"{h:>8}" for h in heads)]
    for task in tasks:
        first = by_key[(task, "full", None)]
        cells = [by_key.get((task, source, k)) for source, k in columns]
        lines.append(f"{task:<{width}}  {first.n_train:>5}  {first.n_test:>4}  {first.split:<10}  "
                     + "  ".join(f"{c.accuracy:>8.3f}" if c else f"{'-':>8}" for c in cells))
    if len(tasks) > 1:
        means = [np.mean([by_key[(t, source, k)].accuracy for t in tasks]) for source, k in columns]
        lines.append(f"{'mean':<{width}}  {'':>5}  {'':>4}  {'':<10}  " + "  ".join(f"{m:>8.3f}" for m in means))
    k_max = result.ks[-1]
    for task in tasks:
        picked = by_key[(task, "sae", k_max)].features
        lines.append(f"{task}: SAE latents at k={k_max}: {', '.join(map(str, picked))}")
    lines.extend(result.skipped)
    return "\n".join(lines)
