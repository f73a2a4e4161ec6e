# genseg prediction server for a Vertex AI custom container (or any container platform).
#   CPU (default):  docker build -t genseg-serve .
#   CUDA:           docker build -t genseg-serve:cuda --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
# The model folder (a `genseg train-seg` run directory) is baked in at /model, or Vertex AI copies it from
# AIP_STORAGE_URI (a gs:// URI needs the gcs extra, installed below).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY genseg ./genseg
# On the CPU base, take torch's CPU wheels (a CUDA base image already brings its own torch).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m pip install --extra-index-url ${TORCH_INDEX} '.[serve,gcs]'

ARG MODEL_DIR=checkpoints/demo/segmenter
COPY ${MODEL_DIR} /model
# Vertex AI overrides AIP_STORAGE_URI with the model artifacts it copied; /model is the baked-in default.
ENV AIP_HTTP_PORT=8080 AIP_HEALTH_ROUTE=/health AIP_PREDICT_ROUTE=/predict AIP_STORAGE_URI=/model
EXPOSE 8080
ENTRYPOINT ["genseg", "serve", "--host", "0.0.0.0"]
