# CPU image for the download, snr_scan and layer_select stages, and the Prefect worker of the process pool (which also runs the compare flow).
# Build from the repository root:  docker build -f containers/cpu.Dockerfile -t spectrum-cpu .
# Run a stage exactly as the "separate process" mode does, e.g.:
#   docker run --rm -v /models:/models spectrum-cpu stages.snr_scan /models/llama --out /models/snr.parquet
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 TORCH_EXTENSIONS_DIR=/opt/torch-extensions
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY stages ./stages
COPY flows ./flows
COPY spectrum_cli ./spectrum_cli
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt .
# DeepSpeed's CPU communication op, compiled here once: several ranks load it; one rank never needs it (opbuild.skip_ops).
# Nothing compiles when a container runs.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
 && python -c "from stages.training.opbuild import build_ops; build_ops()"
ENTRYPOINT ["python", "-m"]
CMD ["stages.snr_scan", "--help"]
