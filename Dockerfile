# Worker / dashboard image: the official PyTorch CUDA runtime image (torch + torchvision inside) + sft-optuna.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sft_optuna ./sft_optuna
COPY studies ./studies
# torch/torchvision from the base image satisfy torch>=2.4; this adds optuna, the dashboard and psycopg.
RUN pip install --no-cache-dir '.[postgres]'
ENV PYTHONUNBUFFERED=1
CMD ["sft-optuna", "--help"]
