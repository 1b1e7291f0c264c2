-- Rollups read across every account and gateway (issue 18). Merging a t-digest state costs about 7.5 us,
-- and at 50M events in 30 days the unfiltered page merged tens of thousands per query: events_by_day
-- holds a row per day x account x gateway x model x endpoint x outcome (95k rows, 0.5 s per query), and
-- the account-first sort key of gateways_by_hour (kept for scoped queries, which it prunes) reads every
-- gateway's rows for a time range. These tables keep only the columns an unscoped grouping needs, sorted
-- by time first, in small granules (1,024 rows) so a time range reads little more than itself:
--   all_models_by_hour/day    per model x endpoint x outcome (51 rows per hour or day here)
--   all_gateways_by_hour/day  per account x gateway (the day level scoped narrow groupings use too)
--   all_by_hour               per hour alone (the page's chart)
-- Each is filled by a view on the rollup it coarsens (a view on a view's target runs on the rows that
-- view inserts: a few per key and block, not per event), and consumers.queries.Levels.params picks the
-- smallest table that answers. Counts are the same sums; digests are the same digests merged again. The
-- other columns exist as ALIAS '' so every query text reads every table.

CREATE TABLE IF NOT EXISTS all_models_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String) ALIAS '',
    gateway_id LowCardinality(String) ALIAS '',
    model LowCardinality(String),
    endpoint LowCardinality(String),
    outcome LowCardinality(String),
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
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS all_models_by_day AS all_models_by_hour
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, model, endpoint, outcome)
TTL hour + toIntervalDay(400)
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS all_gateways_by_hour
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
ORDER BY (hour, account_id, gateway_id)
TTL hour + toIntervalDay(400)
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS all_gateways_by_day AS all_gateways_by_hour
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, account_id, gateway_id)
TTL hour + toIntervalDay(400)
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS all_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String) ALIAS '',
    gateway_id LowCardinality(String) ALIAS '',
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
ORDER BY (hour)
TTL hour + toIntervalDay(400)
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS all_models_by_hour_mv TO all_models_by_hour AS
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

CREATE MATERIALIZED VIEW IF NOT EXISTS all_models_by_day_mv TO all_models_by_day AS
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

CREATE MATERIALIZED VIEW IF NOT EXISTS all_gateways_by_hour_mv TO all_gateways_by_hour AS
SELECT
    hour AS hour, account_id, gateway_id,
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

CREATE MATERIALIZED VIEW IF NOT EXISTS all_gateways_by_day_mv TO all_gateways_by_day AS
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

CREATE MATERIALIZED VIEW IF NOT EXISTS all_by_hour_mv TO all_by_hour AS
SELECT
    hour AS hour,
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
GROUP BY hour;

-- What was stored before, from the rollups these coarsen. As with 0009, an insert between the views
-- above and these statements would be counted twice: the consumer migrates before it consumes.
INSERT INTO all_models_by_hour
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

INSERT INTO all_models_by_day
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

INSERT INTO all_gateways_by_hour
SELECT
    hour AS hour, account_id, gateway_id,
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

INSERT INTO all_gateways_by_day
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

INSERT INTO all_by_hour
SELECT
    hour AS hour,
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
GROUP BY hour;

-- Their retention rows (migration 0012), as 0014 adds its tables'.
INSERT INTO table_retention (table_name, setting, ttl_expression, days)
SELECT name, 'aggregate', 'hour', toUInt32(extract(engine_full, 'TTL .* \\+ toIntervalDay\\((\\d+)\\)'))
FROM system.tables
WHERE database = currentDatabase() AND name IN ('all_models_by_hour', 'all_models_by_day', 'all_gateways_by_hour', 'all_gateways_by_day', 'all_by_hour');
