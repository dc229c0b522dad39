# A LayerSwarm peer. Example:
#   docker build -t layerswarm .
#   docker run --rm -p 7001:7001 layerswarm serve --layers 0:10 --host 0.0.0.0 --port 7001 \
#       --public-address MY_IP:7001
FROM python:3.11-slim
ENV HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1 LAYERSWARM_CACHE=/cache
ARG TORCH="torch==2.13.0"
WORKDIR /app
RUN pip install "$TORCH"
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY peers ./peers
COPY configs ./configs
RUN pip install .
VOLUME /cache
ENTRYPOINT ["peer"]
CMD ["--help"]
