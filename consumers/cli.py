"""`cohere-gateway consume` and `cohere-gateway report`. Heavy imports stay inside the commands so that
`--help` is fast."""

from __future__ import annotations

import click

from cohere_gateway import settings as s


@click.command()
@s.click_options(s.ConsumerSettings)
def consume(**kwargs: object) -> None:
    """Consume gateway events from Kafka into ClickHouse (embedded by default, or a server).

    Runs as a member of a consumer group: start several to share the topic's partitions. Serves
    /readyz, /metrics and the read API (/api/...) on --http-port. SIGTERM finishes the batch in hand.
    """
    from cohere_gateway.consumers.service import serve

    try:
        serve(s.from_kwargs(s.ConsumerSettings, kwargs))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@s.click_options(s.ReportSettings)
def report(**kwargs: object) -> None:
    """Print request totals, latency, tokens and cost for a recent window, grouped by a field.

    Reads through the running consumer's API when one owns the data directory, else opens the storage.
    """
    from cohere_gateway.consumers.report import run_report

    try:
        run_report(s.from_kwargs(s.ReportSettings, kwargs))
    except ValueError as exc:  # QueryError, bad URL
        raise click.ClickException(str(exc)) from None
