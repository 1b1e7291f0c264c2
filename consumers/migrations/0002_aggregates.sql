-- Per-minute aggregates fed by materialized views, so charts never scan raw events.
-- Insert deduplication (same token => no-op) reaches these tables too, which keeps them exact
-- when the consumer re-inserts a batch after a crash (docs/storage.md).
CREATE TABLE IF NOT EXISTS events_by_minute
(
    minute DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    model LowCardinality(String),
    endpoint LowCardinality(String),
    outcome LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    streams SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    latency_ms AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64),
    ttft_ms AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (account_id, gateway_id, minute, model, endpoint, outcome)
TTL minute + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_by_minute_mv TO events_by_minute AS
SELECT
    toStartOfMinute(start_time) AS minute,
    account_id,
    gateway_id,
    ifNull(model, '') AS model,
    endpoint,
    outcome,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    countIf(stream) AS streams,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(cost_usd, 0)) AS cost_usd,
    quantilesState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM events
GROUP BY minute, account_id, gateway_id, model, endpoint, outcome;

CREATE TABLE IF NOT EXISTS errors_by_minute
(
    minute DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    model LowCardinality(String),
    endpoint LowCardinality(String),
    outcome LowCardinality(String),
    error_type LowCardinality(String),
    status_code UInt16,
    errors SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (account_id, gateway_id, minute, error_type, status_code, model, endpoint, outcome)
TTL minute + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS errors_by_minute_mv TO errors_by_minute AS
SELECT
    toStartOfMinute(start_time) AS minute,
    account_id,
    gateway_id,
    ifNull(model, '') AS model,
    endpoint,
    outcome,
    ifNull(error_type, '') AS error_type,
    status_code,
    count() AS errors
FROM events
WHERE outcome != 'ok'
GROUP BY minute, account_id, gateway_id, model, endpoint, outcome, error_type, status_code;
