-- The consumer inserts each event as the gateway's contract encodes it, with `usage` and `latency` as
-- nested objects: the ephemeral tuples below receive them and the flat columns take their values by
-- default expression, so ClickHouse flattens the row instead of Python (about 7 µs per event less,
-- bench/RESULTS.md, sink). Inserts must name their columns (consumers.rows.EVENT_COLUMNS): an INSERT
-- without a column list skips ephemeral columns.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS usage Tuple(
        input_tokens Nullable(UInt64),
        output_tokens Nullable(UInt64),
        raw_input_tokens Nullable(UInt64),
        raw_output_tokens Nullable(UInt64),
        cached_tokens Nullable(UInt64),
        search_units Nullable(UInt64),
        classifications Nullable(UInt64),
        embeddings Nullable(UInt64)
    ) EPHEMERAL,
    ADD COLUMN IF NOT EXISTS latency Tuple(
        total_ms Float64,
        upstream_ttfb_ms Nullable(Float64),
        ttft_ms Nullable(Float64),
        gateway_overhead_ms Nullable(Float64)
    ) EPHEMERAL;

ALTER TABLE events
    MODIFY COLUMN usage_input_tokens Nullable(UInt64) DEFAULT usage.input_tokens,
    MODIFY COLUMN usage_output_tokens Nullable(UInt64) DEFAULT usage.output_tokens,
    MODIFY COLUMN usage_raw_input_tokens Nullable(UInt64) DEFAULT usage.raw_input_tokens,
    MODIFY COLUMN usage_raw_output_tokens Nullable(UInt64) DEFAULT usage.raw_output_tokens,
    MODIFY COLUMN usage_cached_tokens Nullable(UInt64) DEFAULT usage.cached_tokens,
    MODIFY COLUMN usage_search_units Nullable(UInt64) DEFAULT usage.search_units,
    MODIFY COLUMN usage_classifications Nullable(UInt64) DEFAULT usage.classifications,
    MODIFY COLUMN usage_embeddings Nullable(UInt64) DEFAULT usage.embeddings,
    MODIFY COLUMN latency_total_ms Float64 DEFAULT latency.total_ms,
    MODIFY COLUMN latency_upstream_ttfb_ms Nullable(Float64) DEFAULT latency.upstream_ttfb_ms,
    MODIFY COLUMN latency_ttft_ms Nullable(Float64) DEFAULT latency.ttft_ms,
    MODIFY COLUMN latency_gateway_overhead_ms Nullable(Float64) DEFAULT latency.gateway_overhead_ms;
