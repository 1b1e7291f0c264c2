"""Wires the consumer process together: storage, read API, signals, the consume loop."""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from cohere_gateway import gateway_file
from cohere_gateway.consumers.backends import chdb_path, open_backend
from cohere_gateway.consumers.consumer import Consumer
from cohere_gateway.consumers.http_api import (
    ReadApi,
    allowed_host_set,
    check_exposure,
    remove_discovery,
    write_discovery,
)
from cohere_gateway.consumers.metrics import Metrics
from cohere_gateway.settings import ConsumerSettings

log = logging.getLogger("cohere_gateway.consumers")


def serve(cfg: ConsumerSettings, stop: threading.Event | None = None) -> None:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING if cfg.log_level != "debug" else logging.DEBUG)
    # clickhouse-connect logs a full traceback on every failed request; the consumer logs one line that
    # says what to check (consumers.backends.explain_server_error), so keep theirs for --log-level debug.
    for noisy in ("clickhouse_connect", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR if cfg.log_level != "debug" else logging.DEBUG)
    if cfg.batch_size < 1 or cfg.batch_wait_ms < 1:
        raise ValueError("--batch-size and --batch-wait-ms must be at least 1")
    if cfg.rollup_wait_ms < 0:
        raise ValueError("--rollup-wait-ms must be 0 or more")
    if cfg.partitions < 1:
        raise ValueError(f"--partitions must be at least 1, not {cfg.partitions}")
    if cfg.http_port >= 0:
        check_exposure(cfg.http_host, cfg.api_token)  # before anything starts
    if cfg.gateway_config:  # a file the read side cannot use is the operator's error now, not at first view
        gateway_file.read_budgets(Path(cfg.gateway_config))
    stop = stop or threading.Event()
    backend = open_backend(cfg.clickhouse, cfg.data_dir)
    # The read side may query as a read-only user (server mode): a bug in it then cannot write or drop.
    reader = open_backend(cfg.read_clickhouse, cfg.data_dir) if cfg.read_clickhouse else backend
    metrics = Metrics()
    api = None
    if cfg.http_port >= 0:
        api = ReadApi(reader, metrics, cfg.http_host, cfg.http_port, token=cfg.api_token,
                      allowed_hosts=allowed_host_set(cfg.allowed_hosts, cfg.http_host),
                      gateway_config=Path(cfg.gateway_config) if cfg.gateway_config else None)  # fmt: skip
        api.start()
        if not cfg.clickhouse:
            write_discovery(chdb_path(cfg.data_dir), api.url)
        log.info("read API on %s (/readyz, /metrics, /api/summary)", api.url)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        Consumer(cfg, backend, metrics).run(stop)
    finally:
        if api is not None:
            api.stop()
            if not cfg.clickhouse:
                remove_discovery(chdb_path(cfg.data_dir))
        if reader is not backend:
            reader.close()
        backend.close()
        log.info("consumer stopped")
