# asyncflow as a FLAME analysis image: nnU-Net v2 segmentation of DICOM/NIfTI archives on a GPU node.
#
#   podman build -t asyncflow-flame .          (docker build works the same)
#   podman build -t asyncflow-flame --build-arg MODEL_URL=https://.../model.zip --build-arg TASK_NAME=Dataset029_LiTS .
#
# CI builds it from a Debian base it makes itself with debootstrap, then runs it read-only as its
# user (.ci/image). See docs/how-to/flame.md for model weights, the settings and the master image.
# No MITK and no Qt: DICOM is read with pydicom/SimpleITK and SEG is written with highdicom.

# Debian 13: its Python (3.13) has everything asyncflow uses (tarfile's extraction filters need
# 3.11.4; Debian 12 and Ubuntu 22.04 ship older 3.11s). No CUDA image: torch's wheels bring their
# own CUDA runtime, cuDNN and cuBLAS; the node needs only the NVIDIA driver (for constraints.txt's
# torch, a CUDA 13 build: driver 580 or newer; asyncflow says so at start when it is older).
ARG BASE=docker.io/library/debian:trixie-slim
FROM ${BASE}

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# MALLOC_ARENA_MAX: glibc's per-thread arenas kept memory freed by the worker threads that stream
# a node's objects, so peak RSS crept up with the request's size; with two arenas it did not
# (benchmarks/RESULTS-fetch.md). MPLCONFIGDIR: matplotlib (imported by nnU-Net) wants a writable
# cache folder, and a node may run the image with a read-only root file system.
ENV VIRTUAL_ENV=/opt/asyncflow \
    PATH=/opt/asyncflow/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# pip first: the pip that venv brings may be older than the one asyncflow's extras were tested with.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/asyncflow && pip install --no-cache-dir --upgrade pip

WORKDIR /opt/src
COPY pyproject.toml README.md constraints.txt ./
COPY asyncflow ./asyncflow
# asyncflow's extras allow ranges; constraints.txt holds the exact torch, torchvision, nnU-Net
# and OpenDP builds it is tested with (dp: OpenDP, for statistics results with epsilon).
# EXTRAS=v1,v2,dp adds nnU-Net v1 (nnUNet_predict) for v1 models such as the reference's Task029_LiTS.
ARG EXTRAS=v2,dp
# The FLAME SDK, pinned by commit (a tag can move): flamesdk 0.5.0 and python-sdk-patterns 0.6.4,
# the releases asyncflow was checked with, as source archives (no git needed). The patterns pin
# flamesdk by git tag, so they go in without dependencies (flamesdk and OpenDP are in already).
# FLAME_SDK= and FLAME_PATTERNS= (both empty) build without the SDK; any pip requirement works,
# a wheel's URL included.
ARG FLAME_SDK="flamesdk @ https://github.com/PrivateAIM/python-sdk/archive/ddf216c4c1131d30b2f76e6f0ddb80340f7e3f9a.tar.gz"
ARG FLAME_PATTERNS="flame @ https://github.com/PrivateAIM/python-sdk-patterns/archive/b2622ac4c761bd87ba781fd01d27e2573c31c326.tar.gz"
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt ".[${EXTRAS}]" ${FLAME_SDK:+"$FLAME_SDK"} \
    && if [ -n "${FLAME_PATTERNS}" ]; then \
        pip install --no-cache-dir --no-deps "${FLAME_PATTERNS}" \
        && python -c "import asyncflow.flame as f; assert f.FLAME_SDK, 'FLAME SDK missing'"; \
    fi

# The environment names of the reference image. nnU-Net v2 reads nnUNet_results; asyncflow also
# accepts RESULTS_FOLDER. The model folder is $nnUNet_results/$TASK_NAME/nnUNetTrainer__nnUNetPlans__3d_fullres.
ARG TASK_NAME=""
ENV nnUNet_results=/opt/nnunet_results \
    RESULTS_FOLDER=/opt/nnunet_results \
    nnUNet_input=/nnUNet_input \
    nnUNet_output=/nnUNet_output \
    TASK_NAME=${TASK_NAME} \
    MULTI_MODAL=False

# Model weights, option 1: a model ZIP made by nnUNetv2_export_model_to_zip, fetched at build time.
# (Option 2: a derived image that COPYs a model folder into /opt/nnunet_results;
#  option 3, local runs only: mount one there read-only.)
ARG MODEL_URL=""
RUN mkdir -p /opt/nnunet_results \
    && if [ -n "${MODEL_URL}" ]; then nnUNetv2_download_pretrained_model_by_url "${MODEL_URL}"; fi

# The model folder stays root's and read-only to the node's user: asyncflow never writes into it
# (nnU-Net v1 gets a writable overlay in the temp folder). /opt/code: where the Hub's analysis
# images put the analysis script they run on this image as their master image.
RUN useradd --create-home --uid 10001 asyncflow \
    && chmod -R a-w /opt/nnunet_results \
    && mkdir -p /opt/code
USER 10001
WORKDIR /home/asyncflow

# One FLAME node: the analyzer or the aggregator, as the Hub assigns the role.
CMD ["asyncflow", "flame"]
