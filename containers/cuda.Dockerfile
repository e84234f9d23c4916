# CUDA image for the GPU stages (cpt, sft, evaluate; snr_scan with --device cuda also runs here).
# Build from the repository root:  docker build -f containers/cuda.Dockerfile -t spectrum-cuda .
#   docker run --rm --gpus all -v /models:/models spectrum-cuda stages.snr_scan /models/llama --out /models/snr.parquet --device cuda
# Ubuntu 24.04 ships Python 3.12, not the 3.11 the project is tested with, and apt has no
# python3.11 there: uv installs the same CPython 3.11 as the CPU image and CI use.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 DEBIAN_FRONTEND=noninteractive UV_PYTHON_INSTALL_DIR=/opt/python
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY stages ./stages
COPY flows ./flows
COPY spectrum_cli ./spectrum_cli
# torch==2.13.0 from the default index is the CUDA build on Linux x86_64.
RUN uv pip install --no-cache -c constraints.txt torch==2.13.0 \
 && uv pip install --no-cache -c constraints.txt .
ENTRYPOINT ["python", "-m"]
CMD ["stages.cpt", "--help"]
