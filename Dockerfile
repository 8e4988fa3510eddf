# One image for the API and the worker (docker-compose.yml picks the command).
#
# torch: pyproject pins torch==2.13.0. From the default index that wheel is the
# CUDA build on linux/x86_64, which serves GPU hosts and runs on CPU too.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#       a smaller CPU-only image (the same version from a CPU wheel index);
#   --build-arg BASE_IMAGE=<a GPU image with Python >= 3.11 and torch> --build-arg USE_BASE_TORCH=1
#       keeps the base image's own torch build (e.g. a vendor build numbered
#       2.13.0a0+..., which the exact pin would otherwise replace).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies first, from pyproject.toml alone, so a code change does not reinstall them;
# at the versions the test suite passed with (constraints.txt, which leaves torch to the pin or the base image).
ARG TORCH_INDEX_URL=
ARG USE_BASE_TORCH=
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && if [ -n "$USE_BASE_TORCH" ]; then \
        python -c "import torch; print('keeping the base image torch', torch.__version__)" \
        && sed -i '/^torch[=<>~ ]/d' /tmp/requirements.txt; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$(grep '^torch==' /tmp/requirements.txt)" --index-url "$TORCH_INDEX_URL"; \
    fi \
 && pip install -r /tmp/requirements.txt -c constraints.txt \
 && rm /tmp/requirements.txt

COPY . .
# Editable, so the Alembic scripts under migrations/ are used from /app as they are;
# --no-deps: the dependencies are in place (and the base image's torch stays).
# uid 1000 for every build, so API and worker images (a CPU one and a GPU one, say) can share
# the model store volume; --non-unique: GPU base images on Ubuntu 24.04 already have a uid 1000
# (`ubuntu`), where a plain useradd fails the build ("UID 1000 is not unique").
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 1000 --non-unique unlearnd \
 && mkdir -p /app/var /data/models \
 && chown -R unlearnd /app/var /data

USER unlearnd
ENV UNLEARND_HOST=0.0.0.0 \
    UNLEARND_STORE_DIR=/data/models
EXPOSE 8000
CMD ["unlearnd", "serve"]
