-- Hourly rollups for top_api_keys and top_metadata (issue 18): a 30-day "heaviest keys / users" had
-- scanned every raw event of the window. Per hour x account x gateway x key fingerprint, and per hour x
-- account x gateway x metadata key x value; the queries read whole hours here and the ragged ends of the
-- window from `events` (consumers.queries.Levels), so counts stay exact. A metadata key with a value per
-- request (a trace id) makes its rollup as large as the events: keep such values out of cf-aig-metadata.
CREATE TABLE IF NOT EXISTS keys_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    api_key_fingerprint String,
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    search_units SimpleAggregateFunction(sum, UInt64),
    images SimpleAggregateFunction(sum, UInt64),
    image_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    unpriced_requests SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, gateway_id, hour, api_key_fingerprint)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS keys_by_hour_mv TO keys_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    ifNull(events.api_key_fingerprint, '') AS api_key_fingerprint,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests
FROM events
GROUP BY hour, account_id, gateway_id, api_key_fingerprint;

CREATE TABLE IF NOT EXISTS metadata_by_hour
(
    hour DateTime('UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    key String,
    value String,
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    search_units SimpleAggregateFunction(sum, UInt64),
    images SimpleAggregateFunction(sum, UInt64),
    image_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    unpriced_requests SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (key, account_id, gateway_id, hour, value)
TTL hour + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS metadata_by_hour_mv TO metadata_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    kv.1 AS key,
    kv.2 AS value,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests
FROM events
ARRAY JOIN arrayZip(mapKeys(metadata), mapValues(metadata)) AS kv
GROUP BY hour, account_id, gateway_id, key, value;

-- What was stored before (raw events, 90 days by default). As with 0006 and 0009, an insert between the
-- views above and these statements would be counted twice; the consumer migrates before it consumes.
INSERT INTO keys_by_hour
SELECT toStartOfHour(start_time) AS hour, account_id, gateway_id, ifNull(api_key_fingerprint, ''),
    count(), countIf(outcome != 'ok'), sum(ifNull(usage_input_tokens, 0)),
    sum(ifNull(usage_output_tokens, 0)), sum(ifNull(usage_search_units, 0)), sum(ifNull(usage_images, 0)),
    sum(ifNull(usage_image_tokens, 0)), sum(ifNull(cost_usd, 0)), countIf(cost_usd IS NULL)
FROM events
GROUP BY hour, account_id, gateway_id, api_key_fingerprint;

INSERT INTO metadata_by_hour
SELECT toStartOfHour(start_time) AS hour, account_id, gateway_id, kv.1, kv.2,
    count(), countIf(outcome != 'ok'), sum(ifNull(usage_input_tokens, 0)),
    sum(ifNull(usage_output_tokens, 0)), sum(ifNull(usage_search_units, 0)), sum(ifNull(usage_images, 0)),
    sum(ifNull(usage_image_tokens, 0)), sum(ifNull(cost_usd, 0)), countIf(cost_usd IS NULL)
FROM events
ARRAY JOIN arrayZip(mapKeys(metadata), mapValues(metadata)) AS kv
GROUP BY hour, account_id, gateway_id, kv.1, kv.2;
