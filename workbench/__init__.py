"""The workbench's front door: the few calls a session starts with, imported on first use
(``import workbench`` stays cheap, so the CLI starts fast).

    import workbench
    loaded = workbench.load_model("tiny-llama")                       # a TransformerBridge + tokenizer
    workbench.run_cache(db="ws.duckdb", model="tiny-llama", hooks=["blocks.1.hook_resid_post"],
                        corpus="stdlib", tokens=8192, ctx=64)          # resumable activation cache
    with workbench.Workspace("ws.duckdb") as ws:
        sae = workbench.train_sae(ws, "blocks.1.hook_resid_post", dict(arch="topk", width=256, k=8),
                                  workbench.TrainConfig(total_tokens=16384, batch_size=512))
    with workbench.steer(loaded.model, workbench.SteeringSpec.single(source=str(sae.path), index=3, strength=4.0,
                                                                      unit="raw", hook="blocks.1.hook_resid_post")):
        ...                                                            # generate with the feature added
"""

from __future__ import annotations

import importlib

_API = {
    "load_model": "workbench.models",
    "run_cache": "workbench.caching",
    "Workspace": "workbench.workspace",
    "train_sae": "workbench.training",
    "analyze": "workbench.analysis",
    "steer": "workbench.steering",
    "SteeringSpec": "workbench.steering",
    "load_sae": "saes",
    "TrainConfig": "saes",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
