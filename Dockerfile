# syntax=docker/dockerfile:1
# The Shopsight platform image: the `shopsight` command with Spark (Java 17), Ray, Feast and MLflow, as the
# Kubernetes manifests in infra/k8s run it (Ray head and workers, RayJob and RayService, Spark driver and
# executors, the MLflow server, the Feast feature server). Two variants, chosen by one build argument:
#
#   docker build -t REGISTRY/shopsight:0.1.0-cpu .                         # CPU: torch's CPU build
#   docker build --build-arg VARIANT=cuda -t REGISTRY/shopsight:0.1.0-cuda .  # CUDA: torch's CUDA build
#
# Every package is pinned and hash-checked (pip --require-hashes), from a lock per variant that
# requirements/compile.sh generates with the same pins as `make` installs locally (requirements/lock.txt):
#   cpu:  requirements/lock-image-cpu.txt, torch 2.13.0+cpu (from PyTorch's CPU index; its hash is in the lock)
#   cuda: requirements/lock-image-cuda.txt, PyPI's torch 2.13.0, which is the CUDA 13.0 build, with the
#         nvidia-* wheels of CUDA 13.0 from PyPI (all hashes in the lock). The wheels bring the CUDA libraries,
#         the base image the rest of the CUDA 13.0 runtime; the node needs only a driver for CUDA 13 (580+).

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
# The base images by digest: a tag moves (every rebuild of python:3.11-slim-bookworm), a digest names one
# image. Release builds pass the digest the tag has when the release is cut, for each platform built:
#   docker buildx imagetools inspect python:3.11-slim-bookworm            # Digest: sha256:...
#   docker build --build-arg CPU_BASE_DIGEST=sha256:... --build-arg CUDA_BASE_DIGEST=sha256:... .
# Empty (the default here): the tag alone. tests/unit/test_infra.py checks that a digest given here is one.
ARG CPU_BASE_DIGEST=
ARG CUDA_BASE_DIGEST=

# Debian's and Ubuntu's packages are not pinned to versions (hadolint DL3008): their archives keep only the
# newest build of each package of a release, so a pinned version stops resolving at the next security
# update, which is the update a rebuild should take. The release is fixed by the base image (tag or digest),
# the versions installed are recorded in the image (`dpkg -l`); Python's packages are pinned and hashed below.

# --- cpu: Debian with Python 3.11 --------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE}${CPU_BASE_DIGEST:+@${CPU_BASE_DIGEST}} AS base-cpu
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini procps wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHON_BIN=/usr/local/bin/python3.11

# --- cuda: NVIDIA's CUDA runtime on Ubuntu, Python 3.11 from the deadsnakes archive -------------------------
FROM ${CUDA_BASE_IMAGE}${CUDA_BASE_DIGEST:+@${CUDA_BASE_DIGEST}} AS base-cuda
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      openjdk-17-jre-headless tini procps wget \
 && apt-get purge -y software-properties-common gpg-agent \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHON_BIN=/usr/bin/python3.11

# --- the platform, on the chosen base ---------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS platform
ARG VARIANT

# PYTHONSAFEPATH: never put a script's folder (or the working directory) first on sys.path, so that no file
# in the image shadows an installed module (docs/architecture.md: `platform` vs the standard library).
ENV PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    JAVA_HOME=/usr/lib/jvm/java-17 \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark

# One JAVA_HOME whatever the architecture's folder name; a virtualenv for everything Python, first on PATH
# for login shells too: KubeRay starts Ray with `bash -lc`, and Debian's /etc/profile resets PATH.
RUN ln -s "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" "${JAVA_HOME}" \
 && "${PYTHON_BIN}" -m venv "${VIRTUAL_ENV}" \
 && echo "export PATH=\"${VIRTUAL_ENV}/bin:\$PATH\"" > /etc/profile.d/shopsight-venv.sh

WORKDIR /opt/shopsight

# The dependencies, hash-checked, before the sources (a layer that a code change keeps): pip and the build
# tools first (lock-build.txt), then the variant's lock, boto3 included (the MLflow server writes to S3).
# --no-build-isolation: pyspark's sdist, and the package below, are built by the locked setuptools.
COPY requirements/lock-build.txt requirements/lock-image-cpu.txt requirements/lock-image-cuda.txt requirements/
# The CPU lock's extra index is in the positional parameters ("$@"): sh has no arrays, and an unquoted
# variable would be split on any space.
RUN case "${VARIANT}" in \
      cpu)  lock=requirements/lock-image-cpu.txt; set -- --extra-index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) lock=requirements/lock-image-cuda.txt; set -- ;; \
      *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --require-hashes --requirement requirements/lock-build.txt \
 && pip install --require-hashes --no-build-isolation "$@" --requirement "${lock}" \
 && python -c "import torch, sys; cuda = torch.version.cuda is not None; \
sys.exit(0 if cuda == ('${VARIANT}' == 'cuda') else 'torch build does not match VARIANT=${VARIANT}')"

# The package itself: pip cannot hash-check a local project, so it comes without dependencies (all locked above).
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip install --no-deps --no-build-isolation . \
 && pip check \
 && shopsight --version

# Spark on Kubernetes: the driver and executor entry point, and the feature-build driver script.
COPY infra/spark/ infra/spark/
RUN chmod 0755 infra/spark/entrypoint.sh \
 && groupadd --gid 10001 shopsight \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash shopsight \
 && mkdir -p /data \
 && chown shopsight:shopsight /data

# Non-root, by number so that Kubernetes' runAsNonRoot can check it (the manifests run as 10001 too).
USER 10001:10001
ENTRYPOINT ["/opt/shopsight/infra/spark/entrypoint.sh"]
CMD ["shopsight", "--help"]
