#!/usr/bin/env bash
# Regenerates the hashed locks, for Linux x86_64 (manylinux_2_28) and Python 3.11, with uv's pip compile:
#
#   lock.txt             `make test`: pyproject's dependencies + dev, torch's CPU build
#   lock-bench.txt       `make bench`: pyproject's dependencies + dev + bench, torch's CPU build
#   lock-image-cpu.txt   `docker build` (VARIANT=cpu): pyproject's dependencies + boto3, torch's CPU build
#   lock-image-cuda.txt  `docker build --build-arg VARIANT=cuda`: the same with PyPI's torch (CUDA 13.0 build)
#   lock-build.txt       pip, setuptools and wheel alone (build.in), installed first by `make` and the image:
#                        the other locks are then installed with --no-build-isolation, so that pyspark (an
#                        sdist only) and the project are built by these hashed tools, not by unhashed ones
#                        that pip would fetch into an isolated build environment
#
# Each lock pins build.in's tools too. Run it from anywhere, with uv on PATH (or UV=path):
#
#   python3.11 -m venv /tmp/uv && /tmp/uv/bin/pip install uv==0.13.9 && UV=/tmp/uv/bin/uv requirements/compile.sh
#
# Needs PyPI, and the CPU wheel of torch (torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl) in the folder
# TORCH_CPU_WHEELS (default /opt/wheels). Every lock is constrained (-c) to the pins that the locks hold now,
# torch's aside, so that a regeneration moves nothing that need not move. To move a pin (a new range in
# pyproject.toml, a fix), delete that package's entry from every lock first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-uv}
wheels=${TORCH_CPU_WHEELS:-/opt/wheels}
ls "$wheels"/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl >/dev/null

# The pins of the locks (the "-c" in their "via" notes), for the time of the run.
pins=requirements/current-pins.txt
trap 'rm -f "$pins"' EXIT
cat requirements/lock*.txt | grep -oE '^[A-Za-z0-9][A-Za-z0-9._-]*==[^ ;\\]+' | grep -viE '^torch==' \
    | sort -u >"$pins"

common=(
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
    --constraint "$pins" --custom-compile-command requirements/compile.sh --quiet
)
cpu=(--find-links "$wheels" requirements/cpu.in)

"$uv" pip compile requirements/build.in "${common[@]}" -o requirements/lock-build.txt
"$uv" pip compile pyproject.toml --extra dev requirements/build.in "${cpu[@]}" "${common[@]}" \
    -o requirements/lock.txt
"$uv" pip compile pyproject.toml --extra dev --extra bench requirements/build.in "${cpu[@]}" "${common[@]}" \
    -o requirements/lock-bench.txt
"$uv" pip compile pyproject.toml requirements/image.in requirements/build.in "${cpu[@]}" "${common[@]}" \
    -o requirements/lock-image-cpu.txt
# No find-links: torch 2.13.0 from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build (nvidia-* from PyPI).
# Another CUDA build (e.g. cu128) has its hashes only on PyTorch's index: from a machine that reaches it, add
# --extra-index-url https://download.pytorch.org/whl/cu128 --index-strategy unsafe-best-match and a
# torch==2.13.0+cu128 requirement here, and set the Dockerfile's CUDA_BASE_IMAGE to match.
"$uv" pip compile pyproject.toml requirements/image.in requirements/build.in "${common[@]}" \
    -o requirements/lock-image-cuda.txt
