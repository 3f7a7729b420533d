# The image RLHFFlow's steps run in on Kubernetes / AWS Batch / Argo Workflows: a CUDA runtime, Python 3.11, the
# CUDA build of torch 2.13.0, the pinned requirements and the project. A pod never imports the project copy made
# here: Metaflow ships the flow's code package to every pod (rlhf_lib and configs/ included) and the flow puts
# that copy first, so a run always runs its own code. The copy here is for running a stage by itself in the
# image (`python -m rlhf_lib.stages.ppo ...`).
#
#   docker build -t REGISTRY/rlhf-flow:2.13.0-cu128 .
#   docker push REGISTRY/rlhf-flow:2.13.0-cu128
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Metaflow's pod bootstrap pip-installs boto3 unless told the image has it (it does: metaflow needs it).
    METAFLOW_SKIP_INSTALL_DEPENDENCIES=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates curl git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from PyTorch's CUDA index: requirements.txt pins torch==2.13.0, which this CUDA build satisfies,
# so the next install keeps it (without it, pip would take PyPI's torch==2.13.0, itself a CUDA build on Linux
# x86_64, but for whatever CUDA version PyPI's wheel was built against, not the one chosen here).
RUN pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY requirements.txt /opt/rlhf/requirements.txt
RUN pip install -r /opt/rlhf/requirements.txt \
 && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda, torch.__version__"

COPY rlhf_lib /opt/rlhf/rlhf_lib
COPY flows /opt/rlhf/flows
COPY configs /opt/rlhf/configs
ENV PYTHONPATH=/opt/rlhf
WORKDIR /opt/rlhf
