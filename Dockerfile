# syntax=docker/dockerfile:1
# One image for every pixelmill process: pixelmill-api, pixelmill-worker, pixelmill-migrate.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pixelmill
ENV PATH=/opt/pixelmill/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY db ./db
COPY ingest ./ingest
COPY engine ./engine
COPY ops ./ops
COPY bench ./bench
RUN pip install .

FROM python:3.11-slim AS runtime
# OpenCV's headless wheel still links against GLib.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/pixelmill pixelmill
COPY --from=build /opt/pixelmill /opt/pixelmill
ENV PATH=/opt/pixelmill/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER pixelmill
WORKDIR /home/pixelmill
EXPOSE 3000
CMD ["pixelmill-api", "--bind", "0.0.0.0:3000"]
