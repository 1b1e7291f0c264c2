-- The read side at 50M events (docs/storage.md, "Reading fast"). Per-minute aggregates hold almost one
-- row per event at realistic cardinality (60 gateways x 17 models x outcomes), so a 30-day chart merged
-- tens of millions of `quantiles` states. Hour and day rollups beside them, with t-digest states (a few
-- dozen centroids, cheap to merge, where a `quantiles` reservoir holds up to 8,192 values); the queries
-- read the coarsest level that fits the window and the step, and minutes only for the window's ragged
-- ends (consumers/queries.py, `Levels`), so every count stays exact.
CREATE TABLE IF NOT EXISTS events_by_hour
(
    hour DateTime('UTC'),
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
ORDER BY (account_id, gateway_id, hour, model, endpoint, outcome)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS events_by_day AS events_by_hour
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, gateway_id, hour, model, endpoint, outcome)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_by_hour_mv TO events_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
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
    sum(ifNull(usage_cached_tokens, 0)) AS cached_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_classifications, 0)) AS classifications,
    sum(ifNull(usage_embeddings, 0)) AS embeddings,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), events.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), events.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM events
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

-- `hour` of a day row is the day's first hour (one column name, so one query text reads every level).
CREATE MATERIALIZED VIEW IF NOT EXISTS events_by_day_mv TO events_by_day AS
SELECT
    toStartOfDay(start_time) AS hour,
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
    sum(ifNull(usage_cached_tokens, 0)) AS cached_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_classifications, 0)) AS classifications,
    sum(ifNull(usage_embeddings, 0)) AS embeddings,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), events.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), events.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM events
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

-- Per gateway and hour alone (no model, endpoint, outcome): what the page's cards and charts group by
-- (none, account, gateway). A 30-day window is 720 rows per gateway here, whatever the traffic.
CREATE TABLE IF NOT EXISTS gateways_by_hour
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

CREATE MATERIALIZED VIEW IF NOT EXISTS gateways_by_hour_mv TO gateways_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    countIf(stream) AS streams,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(usage_cached_tokens, 0)) AS cached_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_classifications, 0)) AS classifications,
    sum(ifNull(usage_embeddings, 0)) AS embeddings,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), events.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), events.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM events
GROUP BY hour, account_id, gateway_id;

-- What was stored before: counts from the per-minute table (kept 400 days, exact), latency digests from
-- the raw events still kept (90 days by default; older hours have counts and no quantiles). As with 0006,
-- an insert between the views above and these statements would be counted twice: the consumer migrates
-- before it consumes, so only another consumer sharing the server could write then.
INSERT INTO events_by_hour
SELECT toStartOfHour(minute) AS hour, account_id, gateway_id, model, endpoint, outcome,
    sum(requests), sum(errors), sum(streams), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
    sum(search_units), sum(classifications), sum(embeddings), sum(images), sum(image_tokens), sum(cost_usd),
    sum(unpriced_requests), sum(unpriced_input_tokens), sum(unpriced_output_tokens),
    sum(implied_model_requests),
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(toFloat64(0), false),
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(toFloat64(0), false)
FROM events_by_minute
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

INSERT INTO events_by_hour (hour, account_id, gateway_id, model, endpoint, outcome, latency_ms, ttft_ms)
SELECT toStartOfHour(start_time) AS hour, account_id, gateway_id, ifNull(model, '') AS model, endpoint,
    outcome, quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms),
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL)
FROM events
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

INSERT INTO gateways_by_hour
SELECT hour, account_id, gateway_id,
    sum(requests), sum(errors), sum(streams), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
    sum(search_units), sum(classifications), sum(embeddings), sum(images), sum(image_tokens), sum(cost_usd),
    sum(unpriced_requests), sum(unpriced_input_tokens), sum(unpriced_output_tokens),
    sum(implied_model_requests), quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms)
FROM events_by_hour
GROUP BY hour, account_id, gateway_id;

INSERT INTO events_by_day
SELECT toStartOfDay(hour) AS day, account_id, gateway_id, model, endpoint, outcome,
    sum(requests), sum(errors), sum(streams), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
    sum(search_units), sum(classifications), sum(embeddings), sum(images), sum(image_tokens), sum(cost_usd),
    sum(unpriced_requests), sum(unpriced_input_tokens), sum(unpriced_output_tokens),
    sum(implied_model_requests), quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms)
FROM events_by_hour
GROUP BY day, account_id, gateway_id, model, endpoint, outcome;

-- Skip indexes for the raw-table lookups: an event by id (also pruned by the time inside its UUIDv7 and
-- the `event_ids` lookup), a key fingerprint, metadata keys and values. Parts written before this
-- migration get them when merged; until then they are read, not skipped (the answers are the same).
ALTER TABLE events
    ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1,
    ADD INDEX IF NOT EXISTS idx_key_fingerprint api_key_fingerprint TYPE bloom_filter(0.01) GRANULARITY 1,
    ADD INDEX IF NOT EXISTS idx_metadata_keys mapKeys(metadata) TYPE bloom_filter(0.01) GRANULARITY 1,
    ADD INDEX IF NOT EXISTS idx_metadata_values mapValues(metadata) TYPE bloom_filter(0.01) GRANULARITY 1;
