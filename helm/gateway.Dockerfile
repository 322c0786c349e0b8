# The ctscreen gateway image the chart runs (gateway.image). Build from the repository root:
#   docker build -f helm/gateway.Dockerfile -t registry.example.org/ctscreen/gateway:0.1.0 .
# The gateway needs no GPU and no torch; it talks gRPC to the Triton pods.
FROM python:3.11-slim AS build
WORKDIR /src
# constraints.txt: the exact versions the suite passed with (scripts/constraints.sh writes it)
COPY pyproject.toml README.md constraints.txt ./
COPY ctscreen ./ctscreen
COPY gateway ./gateway
COPY aggregator ./aggregator
COPY phantom ./phantom
COPY training ./training
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# non-root, matching the chart's securityContext (runAsUser 10001, read-only root filesystem, /tmp emptyDir)
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ctscreen
USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# the address uvicorn binds below: the gateway then holds itself to the auth requirement (issue 14) and
# refuses to start without CTSCREEN_AUTH_* (or CTSCREEN_AUTH_INSECURE=true)
ENV CTSCREEN_HOST=0.0.0.0
EXPOSE 8080
# /metrics, when CTSCREEN_METRICS_PORT is set (the chart sets 9102)
EXPOSE 9102
# the chart's command (gateway.command): --http bounds a request's head (CTSCREEN_MAX_REQUEST_HEAD_BYTES), which
# uvicorn's httptools parser does not
CMD ["uvicorn", "--http", "gateway.httpserver:BoundedHttpToolsProtocol", "--factory", "gateway.main:app_from_env", "--host", "0.0.0.0", "--port", "8080"]
