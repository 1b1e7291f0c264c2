"""`cohere-gateway proxy` with kafka-python's loggers at WARNING: a one-line fix, measured by `lean`.

mitmdump's entry point sets the root logger to DEBUG, so every debug call of kafka-python's producer and
I/O thread builds a LogRecord and runs the handlers, which then drop it. Raising the "kafka" logger's
level makes those calls return at once. Usage: `python -m bench.gateway_quiet_logs proxy [flags...]`.
"""

from __future__ import annotations

import logging
import sys

from cohere_gateway.cli import main

if __name__ == "__main__":
    logging.getLogger("kafka").setLevel(logging.WARNING)
    sys.argv[0] = "cohere-gateway"
    main()
