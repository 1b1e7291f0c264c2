-- Hourly rollups for the error and cache panels (issue 18): over 30 days at 50M events the per-minute
-- errors and cache tables hold millions of rows, and the error panel's request total read the per-minute
-- events table. The queries read whole hours here and the window's ragged ends per minute
-- (consumers.queries.Levels), so every count stays exact. Keys without model and endpoint for errors (the
-- panel groups by error type, status and outcome); cache keeps the model (the panel groups by it).
CREATE TABLE IF NOT EXISTS errors_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    outcome LowCardinality(String),
    error_type LowCardinality(String),
    status_code UInt16,
    errors SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, gateway_id, hour, error_type, status_code, outcome)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS errors_by_hour_mv TO errors_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    outcome,
    ifNull(error_type, '') AS error_type,
    status_code,
    count() AS errors
FROM events
WHERE outcome != 'ok'
GROUP BY hour, account_id, gateway_id, outcome, error_type, status_code;

CREATE TABLE IF NOT EXISTS cache_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    model LowCardinality(String),
    lookups SimpleAggregateFunction(sum, UInt64),
    hits SimpleAggregateFunction(sum, UInt64),
    saved_input_tokens SimpleAggregateFunction(sum, UInt64),
    saved_output_tokens SimpleAggregateFunction(sum, UInt64),
    saved_cost_usd SimpleAggregateFunction(sum, Float64),
    saved_cost_unknown SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, gateway_id, hour, model)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS cache_by_hour_mv TO cache_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    ifNull(model, '') AS model,
    countIf(cache_status IN ('HIT', 'MISS', 'EXPIRED')) AS lookups,
    countIf(cache_status = 'HIT') AS hits,
    -- qualified: the aliases below share the columns' names
    sum(ifNull(events.saved_input_tokens, 0)) AS saved_input_tokens,
    sum(ifNull(events.saved_output_tokens, 0)) AS saved_output_tokens,
    sum(ifNull(events.saved_cost_usd, 0)) AS saved_cost_usd,
    countIf(cache_status = 'HIT' AND events.saved_cost_usd IS NULL) AS saved_cost_unknown
FROM events
WHERE cache_status IS NOT NULL
GROUP BY hour, account_id, gateway_id, model;

-- What was stored before, from the per-minute tables (as exact, and kept as long). As with 0009, an
-- insert between the views above and these statements would be counted twice: the consumer migrates
-- before it consumes.
INSERT INTO errors_by_hour
SELECT toStartOfHour(minute) AS hour, account_id, gateway_id, outcome, error_type, status_code, sum(errors)
FROM errors_by_minute
GROUP BY hour, account_id, gateway_id, outcome, error_type, status_code;

INSERT INTO cache_by_hour
SELECT toStartOfHour(minute) AS hour, account_id, gateway_id, model, sum(lookups), sum(hits),
    sum(saved_input_tokens), sum(saved_output_tokens), sum(saved_cost_usd), sum(saved_cost_unknown)
FROM cache_by_minute
GROUP BY hour, account_id, gateway_id, model;

-- Their retention row (migration 0012) with the TTL they were created with; the consumer's start then
-- applies --aggregate-retention-days to them like to every rollup.
INSERT INTO table_retention (table_name, setting, ttl_expression, days)
SELECT name, 'aggregate', 'hour', toUInt32(extract(engine_full, 'TTL .* \\+ toIntervalDay\\((\\d+)\\)'))
FROM system.tables
WHERE database = currentDatabase() AND name IN ('errors_by_hour', 'cache_by_hour');
