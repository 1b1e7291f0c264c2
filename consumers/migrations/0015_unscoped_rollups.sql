-- Rollups for the unscoped page (issue 18). At 50M events in 30 days, merging the latency and TTFT
-- t-digests dominated every unfiltered query: events_by_day holds a row per day x account x gateway x
-- model x endpoint x outcome (95k rows; 0.5 s to merge their digests), gateways_by_hour one per hour x
-- gateway (43k). A query whose scope names no account or gateway needs neither column: models_by_hour
-- and models_by_day drop them (51 rows per hour or day), and gateways_by_day gives the per-gateway
-- groupings a day level. Each is filled by a view on the rollup it coarsens (a view on a view's target
-- runs on the rows that view inserts: a few per key and block, not per event), and the queries pick
-- the smallest table that answers (consumers.queries.Levels.params). Counts are the same sums; the
-- digests are the same digests merged once more.
CREATE TABLE IF NOT EXISTS models_by_hour
(
    hour DateTime('UTC'),
    model LowCardinality(String),
    endpoint LowCardinality(String),
    outcome LowCardinality(String),
    account_id LowCardinality(String) ALIAS '',
    gateway_id LowCardinality(String) ALIAS '',
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    streams SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cached_tokens SimpleAggregateFunction(sum, UInt64),
    search_units SimpleAggregateFunction(sum, UInt64),
    classifications SimpleAggregateFunction(sum, UInt64),
    embeddings SimpleAggregateFunction(sum, UInt64),
    images SimpleAggregateFunction(sum, UInt64),
    image_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    unpriced_requests SimpleAggregateFunction(sum, UInt64),
    unpriced_input_tokens SimpleAggregateFunction(sum, UInt64),
    unpriced_output_tokens SimpleAggregateFunction(sum, UInt64),
    implied_model_requests SimpleAggregateFunction(sum, UInt64),
    latency_ms AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64),
    ttft_ms AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, model, endpoint, outcome)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS models_by_day AS models_by_hour
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, model, endpoint, outcome)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS gateways_by_day
(
    hour DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    model LowCardinality(String) ALIAS '',
    endpoint LowCardinality(String) ALIAS '',
    outcome LowCardinality(String) ALIAS '',
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    streams SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cached_tokens SimpleAggregateFunction(sum, UInt64),
    search_units SimpleAggregateFunction(sum, UInt64),
    classifications SimpleAggregateFunction(sum, UInt64),
    embeddings SimpleAggregateFunction(sum, UInt64),
    images SimpleAggregateFunction(sum, UInt64),
    image_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    unpriced_requests SimpleAggregateFunction(sum, UInt64),
    unpriced_input_tokens SimpleAggregateFunction(sum, UInt64),
    unpriced_output_tokens SimpleAggregateFunction(sum, UInt64),
    implied_model_requests SimpleAggregateFunction(sum, UInt64),
    latency_ms AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64),
    ttft_ms AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, gateway_id, hour)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS models_by_hour_mv TO models_by_hour AS
SELECT
    hour AS hour, model, endpoint, outcome,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_hour
GROUP BY hour, model, endpoint, outcome;

-- `hour` of a day row is the day's first hour, as in events_by_day.
CREATE MATERIALIZED VIEW IF NOT EXISTS models_by_day_mv TO models_by_day AS
SELECT
    hour AS hour, model, endpoint, outcome,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_day
GROUP BY hour, model, endpoint, outcome;

CREATE MATERIALIZED VIEW IF NOT EXISTS gateways_by_day_mv TO gateways_by_day AS
SELECT
    toStartOfDay(hour) AS hour, account_id, gateway_id,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM gateways_by_hour
GROUP BY hour, account_id, gateway_id;

-- What was stored before, from the rollups these coarsen. As with 0009, an insert between the views
-- above and these statements would be counted twice: the consumer migrates before it consumes.
INSERT INTO models_by_hour
SELECT
    hour AS hour, model, endpoint, outcome,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_hour
GROUP BY hour, model, endpoint, outcome;

INSERT INTO models_by_day
SELECT
    hour AS hour, model, endpoint, outcome,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_day
GROUP BY hour, model, endpoint, outcome;

INSERT INTO gateways_by_day
SELECT
    toStartOfDay(hour) AS hour, account_id, gateway_id,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(classifications) AS classifications,
    sum(embeddings) AS embeddings,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    sum(cost_usd) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM gateways_by_hour
GROUP BY hour, account_id, gateway_id;

-- Their retention rows (migration 0012), as 0014 adds its tables'.
INSERT INTO table_retention (table_name, setting, ttl_expression, days)
SELECT name, 'aggregate', 'hour', toUInt32(extract(engine_full, 'TTL .* \\+ toIntervalDay\\((\\d+)\\)'))
FROM system.tables
WHERE database = currentDatabase() AND name IN ('models_by_hour', 'models_by_day', 'gateways_by_day');
