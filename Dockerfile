# One image for the API and the worker (docker-compose.yml picks the command).
#
# torch: pyproject pins torch==2.13.0. From the default index that wheel is the
# CUDA build on linux/x86_64, which serves GPU hosts and runs on CPU too. For a
# smaller CPU-only image, point TORCH_INDEX_URL at a CPU wheel index; a GPU base
# image that brings its own torch 2.13.0 satisfies the pin as it is.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

ARG TORCH_INDEX_URL=
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; fi

COPY . .
# Editable, so the Alembic scripts under migrations/ are used from /app as they are.
RUN pip install -e . \
 && useradd --create-home --uid 1000 unlearnd \
 && mkdir -p /app/var /data/models \
 && chown -R unlearnd /app/var /data

USER unlearnd
ENV UNLEARND_HOST=0.0.0.0 \
    UNLEARND_STORE_DIR=/data/models
EXPOSE 8000
CMD ["unlearnd", "serve"]
