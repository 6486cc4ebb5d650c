# finetune on a CUDA PyTorch base.
#   docker build -t finetune .
#   docker run --rm --gpus all -e HF_TOKEN -v hf-cache:/cache/huggingface -v "$PWD:/workspace" \
#       finetune lora --model Qwen/Qwen2.5-0.5B --data train.jsonl --quant 4bit --bf16 -o runs/qwen-qlora
# Build without DeepSpeed: docker build --build-arg EXTRAS=none -t finetune .
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# Runtime extras of the package to install (deepspeed: the deepspeed-zero2/zero3 presets). bitsandbytes
# (QLoRA) is a core dependency.
ARG EXTRAS=deepspeed

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /opt/finetune
COPY pyproject.toml README.md ./
COPY finetune/ finetune/
COPY recipes/ recipes/

# Keep the base image's CUDA build of torch: pin it, so that no dependency pulls another torch from PyPI.
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[${EXTRAS}]" \
    && rm /tmp/torch-constraint.txt \
    && finetune --version

# A non-root user (uid 1000, `finetune`); the Hub cache lives in a volume so downloads survive containers.
# Hub tokens come only from the environment (docker run -e HF_TOKEN); none is stored in the image.
RUN useradd --create-home --uid 1000 --shell /bin/bash finetune \
    && mkdir -p /cache/huggingface /workspace \
    && chown -R finetune:finetune /cache /workspace
VOLUME ["/cache/huggingface"]
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["finetune"]
CMD ["--help"]
