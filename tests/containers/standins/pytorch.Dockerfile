# Test stand-in for pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime (not reachable here, and its
# CUDA runtime needs a GPU anyway): Python 3.11 with torch 2.13.0 as `python`/`pip` on PATH,
# the CPU wheel in place of the CUDA one. docker/Dockerfile.cuda builds on it unchanged.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
RUN pip install --no-cache-dir --index-url "$PIP_INDEX_URL" "torch==2.13.0+cpu"
