# asyncflow as a FLAME analysis image: nnU-Net v2 segmentation of DICOM/NIfTI archives on a GPU node.
#
#   docker build -t asyncflow-flame .
#   docker build -t asyncflow-flame --build-arg MODEL_URL=https://.../model.zip --build-arg TASK_NAME=Dataset029_LiTS .
#
# See docs/how-to/flame.md for the ways to provide model weights and the settings.
# No MITK and no Qt: DICOM is read with pydicom/SimpleITK and SEG is written with highdicom.

# The CUDA "base" flavour: the NVIDIA container toolkit's environment and nothing else. torch's
# Linux wheels bring their own CUDA runtime, cuDNN and cuBLAS, so a "runtime" or "cudnn" flavour
# would hold a second copy of them (a few GB).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11, the version asyncflow is tested with (Ubuntu 22.04 ships 3.10), from the deadsnakes PPA;
# git for the FLAME SDK, which is installed from its repository.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

# MALLOC_ARENA_MAX: glibc's per-thread arenas kept memory freed by the worker threads that stream
# a node's objects, so peak RSS crept up with the request's size; with two arenas it did not
# (benchmarks/RESULTS-fetch.md).
ENV VIRTUAL_ENV=/opt/asyncflow \
    PATH=/opt/asyncflow/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/asyncflow

# The FLAME SDK: python-sdk-patterns at the tag asyncflow was tested with (0.6.4, which pulls
# flamesdk 0.5.0 from its own pin). Another tag: --build-arg FLAME_SDK_REF=...
ARG FLAME_SDK_REF=0.6.4
WORKDIR /opt/src
COPY pyproject.toml README.md constraints.txt ./
COPY asyncflow ./asyncflow
# asyncflow's extras allow ranges; constraints.txt holds the exact torch, torchvision, nnU-Net
# and OpenDP builds it is tested with (dp: OpenDP, for statistics results with epsilon).
# EXTRAS=v1,v2,dp adds nnU-Net v1 (nnUNet_predict) for v1 models such as the reference's Task029_LiTS.
ARG EXTRAS=v2,dp
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt ".[${EXTRAS}]" \
        "flame @ git+https://github.com/PrivateAIM/python-sdk-patterns.git@${FLAME_SDK_REF}" \
    && python -c "import asyncflow.flame as f; assert f.FLAME_SDK, 'FLAME SDK missing'"

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
#  option 3, local runs only: mount one there with docker run -v.)
ARG MODEL_URL=""
RUN mkdir -p /opt/nnunet_results \
    && if [ -n "${MODEL_URL}" ]; then nnUNetv2_download_pretrained_model_by_url "${MODEL_URL}"; fi

# The model folder stays root's and read-only to the node's user: asyncflow never writes into it
# (nnU-Net v1 gets a writable overlay in the temp folder).
RUN useradd --create-home --uid 10001 asyncflow \
    && chmod -R a-w /opt/nnunet_results
USER 10001
WORKDIR /home/asyncflow

# One FLAME node: the analyzer or the aggregator, as the Hub assigns the role.
CMD ["asyncflow", "flame"]
