# The gateway and the consumer: one image, the `cohere-gateway` command; docker-compose.yml picks the subcommand.
FROM python:3.13-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cohere_gateway ./cohere_gateway
COPY addons ./addons
COPY consumers ./consumers
# The base dependencies only: the `demo` extra (the emulator's aiohttp, the cohere SDK) stays out of the image.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.13-slim
RUN useradd --create-home --uid 10001 gateway && mkdir /data && chown gateway /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER gateway
WORKDIR /data
ENV COHERE_GATEWAY_DATA_DIR=/data PYTHONUNBUFFERED=1
ENTRYPOINT ["cohere-gateway"]
CMD ["--help"]
