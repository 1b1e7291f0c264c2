-- Raw events: one row per gateway event, every field of the contract (cohere_gateway/events.py).
-- ReplacingMergeTree keyed by event_id (last in the sort key) folds any duplicate that slips past insert
-- deduplication; readers use FINAL. Ordered by account, gateway, time: how the dashboard filters.
-- The TTL follows --retention-days through table_retention (migration 0012, consumers/schema.py).
CREATE TABLE IF NOT EXISTS events
(
    event_id String,
    schema_version LowCardinality(String),
    start_time DateTime64(3, 'UTC'),
    end_time DateTime64(3, 'UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    route_mode LowCardinality(String),
    api_version LowCardinality(String),
    endpoint LowCardinality(String),
    method LowCardinality(String),
    path String,
    model LowCardinality(Nullable(String)),
    stream Bool,
    status_code UInt16,
    outcome LowCardinality(String),
    error_type LowCardinality(Nullable(String)),
    error_message Nullable(String),
    usage_input_tokens Nullable(UInt64),
    usage_output_tokens Nullable(UInt64),
    usage_raw_input_tokens Nullable(UInt64),
    usage_raw_output_tokens Nullable(UInt64),
    usage_cached_tokens Nullable(UInt64),
    usage_search_units Nullable(UInt64),
    usage_classifications Nullable(UInt64),
    usage_embeddings Nullable(UInt64),
    finish_reason LowCardinality(Nullable(String)),
    latency_total_ms Float64,
    latency_upstream_ttfb_ms Nullable(Float64),
    latency_ttft_ms Nullable(Float64),
    latency_gateway_overhead_ms Nullable(Float64),
    request_bytes UInt64,
    response_bytes UInt64,
    user_agent Nullable(String),
    api_key_fingerprint LowCardinality(Nullable(String)),
    response_id Nullable(String),
    generation_id Nullable(String),
    client_event_id Nullable(String),
    metadata Map(String, String),
    cost_usd Nullable(Float64),
    cost_source LowCardinality(Nullable(String)),
    request_body Nullable(String) CODEC(ZSTD(3)),
    response_body Nullable(String) CODEC(ZSTD(3)),
    -- Where the event came from in Kafka: for tracing a row back to its message.
    kafka_partition UInt32,
    kafka_offset UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(start_time)
ORDER BY (account_id, gateway_id, start_time, event_id)
TTL toDateTime(start_time) + toIntervalDay(90)
SETTINGS non_replicated_deduplication_window = 10000, allow_nullable_key = 0;
