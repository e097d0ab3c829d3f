"""``workbench explain``: a scored label for every feature of an analysed SAE (resumable).

Everything is checked before anything is written: the explainer and scorer specs, the SAE and its
analysis, the feature ids (on a read-only connection), then the language model (a server must
answer, a local model must have a chat template). Only then is the workspace opened for writing.
"""

from __future__ import annotations

import argparse

from workbench.cli.options import add_db, add_device, add_quiet, integer

EXAMPLE = "workbench explain --db workspaces/default.duckdb --sae demo-topk --features 0-99 --explainer pattern"
SCORER_NAMES = ("detection", "fuzzing")


def configure(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=run_explain_command)
    add_db(p)
    p.add_argument("--sae", required=True, help="SAE name or id (analysed with `workbench analyze`)")
    p.add_argument("--features", default="all", help="all, one id N, a range A-B, or a comma list of those")
    p.add_argument("--explainer", default="pattern",
                   help="pattern (firing statistics, no model), hf:MODEL (hf:default: SmolLM2-135M-Instruct) or openai:URL")
    p.add_argument("--scorer", default=None,
                   help="comma list of detection, fuzzing, or none (default: none for pattern, whose regex is scored exactly; "
                        "detection,fuzzing for a language-model explainer)")
    p.add_argument("--scorer-llm", default=None, help="the judge for detection/fuzzing: hf:MODEL or openai:URL "
                                                      "(default: the explainer's model, or hf:default for pattern)")
    p.add_argument("--llm-model", default=None, help="model name sent to an openai:URL server")
    p.add_argument("--seed", type=integer, default=0, help="seed of the example and held-out window draws")
    add_device(p, model=False)
    add_quiet(p)


def parse_scorers(text: str | None, explainer: str) -> tuple[str, ...]:
    from workbench.explain_llm import ExplainError

    if text is None:
        return () if explainer == "pattern" else SCORER_NAMES
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in SCORER_NAMES]
    if bad:
        raise ExplainError(f"unknown scorer '{bad[0]}': use detection, fuzzing (comma-separated) or none")
    return names


def run_explain_command(args) -> None:
    from workbench.explain_llm import LLMExplainer, LLMJudge, canonical_llm, open_llm, parse_llm_spec
    from workbench.explanations import PATTERN, check_analysed, explain, parse_features
    from workbench.workspace import Workspace, WorkspaceNeedsMigration

    explainer = PATTERN if args.explainer == PATTERN else canonical_llm(args.explainer, args.llm_model)
    scorers = parse_scorers(args.scorer, explainer)
    judge_spec = args.scorer_llm or (args.explainer if explainer != PATTERN else "hf:default")
    if scorers:
        parse_llm_spec(judge_spec)
    try:  # checked on a read-only connection: a bad request leaves the file as it was
        ws = Workspace(args.db, read_only=True, create=False)
    except WorkspaceNeedsMigration:
        ws = None  # an older schema: the writer below migrates it and checks the same things
    if ws is not None:
        with ws:
            record = check_analysed(ws, args.sae)
            features = parse_features(args.features, record.width)
    device = args.device or "cpu"
    llm = open_llm(args.explainer, llm_model=args.llm_model, device=device) if explainer != PATTERN else None
    judge_llm = None
    if scorers:
        same = args.scorer_llm is None and llm is not None
        judge_llm = llm if same else open_llm(judge_spec, llm_model=args.llm_model, device=device)
    with Workspace(args.db, create=False) as ws:
        record = check_analysed(ws, args.sae)
        features = parse_features(args.features, record.width)
        summary = explain(ws, record, features, explainer=explainer, llm_explainer=LLMExplainer(llm) if llm else None,
                          judge=LLMJudge(judge_llm) if judge_llm else None, scorers=scorers, seed=args.seed,
                          progress=not args.quiet)
    mean = "n/a" if summary.mean_headline is None else f"{summary.mean_headline:.3f}"
    metric = "held-out F1" if explainer == PATTERN else "/".join(scorers) + " balanced accuracy" if scorers else "score"
    per = summary.seconds / summary.explained if summary.explained else 0.0
    print(f"explained {summary.explained} features of sae {record.sae_id} with {explainer} "
          f"({summary.skipped} already done), mean {metric} {mean}, {per:.2f} s/feature")
