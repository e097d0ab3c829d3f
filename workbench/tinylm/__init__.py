"""Small Llama-style language models trained offline on this CPU, for activation sparsity laws.

The sparsing law (Luo et al. 2024; docs/algorithms.md §4) measures how the activation ratio of a
model's MLP changes with the number of training tokens D, for ReLU and SiLU models and for
several width/depth ratios. Offline, the workbench trains such a series itself:

    corpus ──train_tokenizer──▶ byte-level BPE (vocab ~4096, deterministic)
           ──prepare_token_data──▶ BOS-prefixed rows of `context` tokens (data.chunk_and_tokenize);
                                   every `heldout_every`-th row is held out, training never sees it
           ──train_tiny_lm──▶ out_dir/tokens_<N>/   one Hugging Face checkpoint per token milestone
                              out_dir/manifest.json  milestones, tokens, train and held-out loss
                              out_dir/heldout.safetensors  the held-out rows (for perplexity)

One module per job:

- ``config``: ``TinyLMConfig`` (dense Llama, or Mixtral MoE with ``n_experts``), validation,
  derived sizes and milestones, parameter counts, shapes at a fixed parameter count;
- ``tokenizer``: the byte-level BPE trained on the corpus (special ids 0-3);
- ``token_data``: tokenizer + training and held-out rows, snapshotted to a directory;
- ``train``: the training loop and its objective (CE, plus the per-layer Switch load-balancing
  loss for MoE), held-out loss, throughput;
- ``checkpoints``: checkpoint and manifest files (safetensors + JSON), exact resume.

Crash-safe directory publishing is ``workbench.publish``.
"""

from workbench.tinylm.checkpoints import (
    CHECKPOINT_JSON,
    CHECKPOINT_PREFIX,
    FORMAT,
    HELDOUT_FILE,
    MANIFEST,
    OPTIMIZER_FILE,
    Checkpoint,
    load_heldout,
    load_series,
    read_manifest,
)
from workbench.tinylm.config import (
    ACTIVATIONS,
    ATTENTION,
    DTYPES,
    EXPERTS,
    SCHEDULES,
    ParamCount,
    SeriesError,
    Shape,
    TinyLMConfig,
    moe_non_embedding_params,
    non_embedding_params,
    shapes_at_fixed_params,
)
from workbench.tinylm.token_data import DATA_JSON, DATA_ROWS, TOKENIZER_SUBDIR, TokenData, load_token_data, prepare_token_data
from workbench.tinylm.tokenizer import SPECIAL_TOKENS, train_tokenizer
from workbench.tinylm.train import (
    TrainLoss,
    build_model,
    heldout_loss,
    load_balancing_loss,
    measure_throughput,
    train_tiny_lm,
    training_loss,
)

__all__ = [
    "ACTIVATIONS",
    "ATTENTION",
    "CHECKPOINT_JSON",
    "CHECKPOINT_PREFIX",
    "DATA_JSON",
    "DATA_ROWS",
    "DTYPES",
    "EXPERTS",
    "FORMAT",
    "HELDOUT_FILE",
    "MANIFEST",
    "OPTIMIZER_FILE",
    "SCHEDULES",
    "SPECIAL_TOKENS",
    "TOKENIZER_SUBDIR",
    "Checkpoint",
    "ParamCount",
    "SeriesError",
    "Shape",
    "TinyLMConfig",
    "TokenData",
    "TrainLoss",
    "build_model",
    "heldout_loss",
    "load_balancing_loss",
    "load_heldout",
    "load_series",
    "load_token_data",
    "measure_throughput",
    "moe_non_embedding_params",
    "non_embedding_params",
    "prepare_token_data",
    "read_manifest",
    "shapes_at_fixed_params",
    "train_tiny_lm",
    "train_tokenizer",
    "training_loss",
]
