# genseg prediction server for a Vertex AI custom container (or any container platform).
#   CPU (default):  docker build -t genseg-serve .
#   CUDA:           docker build -t genseg-serve:cuda --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                     --build-arg TORCH_INDEX= .
# The model (a `genseg train-seg` run directory) is not baked in: Vertex AI copies the uploaded artifacts and
# sets AIP_STORAGE_URI (gs://..., read with the gcs extra installed below); locally, mount a run directory and
# point AIP_STORAGE_URI at it (see README, "Serving").
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# On the CPU base take torch's CPU-only wheels (a fraction of the CUDA ones); a CUDA base brings its own torch.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ -n "${TORCH_INDEX}" ]; then python -m pip install --index-url "${TORCH_INDEX}" torch torchvision; fi
COPY pyproject.toml README.md ./
COPY genseg ./genseg
# onnx: ONNX Runtime for `genseg serve --precision int8` (the model folder's segmenter-int8.onnx)
RUN python -m pip install '.[serve,gcs,onnx]'

ENV AIP_HTTP_PORT=8080 AIP_HEALTH_ROUTE=/health AIP_PREDICT_ROUTE=/predict
EXPOSE 8080
ENTRYPOINT ["genseg", "serve", "--host", "0.0.0.0"]
