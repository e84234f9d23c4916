# CUDA image for the GPU stages (cpt, sft, evaluate; snr_scan with --device cuda also runs here).
# Build from the repository root:  docker build -f containers/cuda.Dockerfile -t spectrum-cuda .
#   docker run --rm --gpus all -v /models:/models spectrum-cuda stages.snr_scan /models/llama --out /models/snr.parquet --device cuda
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY stages ./stages
COPY flows ./flows
# torch==2.13.0 from the default index is the CUDA build on Linux x86_64.
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt .
ENTRYPOINT ["python", "-m"]
CMD ["stages.snr_scan", "--help"]
