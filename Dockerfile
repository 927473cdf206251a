# jsoncache: slim, non-root, with a health check. Build: docker build -t jsoncache .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY upstream_stub ./upstream_stub
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin jsoncache
COPY --from=build /install /usr/local
COPY config.yaml /app/config.yaml
WORKDIR /app
USER 10001
ENV PYTHONUNBUFFERED=1 LOG_FORMAT=json
EXPOSE 8080
# Liveness only: /cache/health/live answers while the process serves requests, even when
# Redis is away (the proxy then passes through; /cache/health reports "degraded").
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/cache/health/live', timeout=2)"]
CMD ["python", "-m", "proxy", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
