#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.py needs on a GPU machine without network whose image holds
# torch, transformers, pyarrow, numpy, pandas, einops, jaxtyping, accelerate, rich, sentencepiece,
# xxhash and pytest (the borrowed H200's does) but not the packages below: those as cp312
# manylinux wheels in .whl/ (versions from constraints.txt), and SmolLM2's tokenizer in
# .gpu/cache/ (the random Llama models of the check use it). Both folders are git-ignored; carry
# them (about 35 MB). gpu_check.py's first line, "(0) packages", names anything still missing.
#
#   bash benchmarks/gpu_bundle.sh          # here, with the project's venv built (make install)
#   # there:  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl .
#   #         PYTHONPATH=/tmp/site WORKBENCH_CACHE=.gpu/cache python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(duckdb transformer-lens eai-sparsify datasets dill multiprocess beartype better-abc fancy-einsum
          typeguard simple-parsing docstring-parser natsort schedulefree)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt || true)
  pins+=("${pin:-$name}")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pins[@]}"
mkdir -p .gpu/cache
.venv/bin/python -c "
import shutil, sys
from workbench.models import default_tokenizer_dir
shutil.copytree(default_tokenizer_dir(), '.gpu/cache/smollm2-135m-tokenizer', dirs_exist_ok=True)"
du -sh .whl .gpu
