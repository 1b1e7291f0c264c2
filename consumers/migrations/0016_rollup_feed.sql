-- The hour and day rollups are written by a second insert, into `rollup_feed`, not by the insert into
-- `events` (issue 19, produce->visible). Every insert writes a part into each view's table whatever its
-- size: with the 12 hour/day tables beside the 4 per-minute ones, a 600-event insert cost 59-66 ms on the
-- embedded engine, 31-34 ms without them. The consumer makes the raw rows (and the per-minute views)
-- visible every --batch-wait-ms and feeds the rollups at most every --rollup-wait-ms, committing Kafka
-- offsets only once both are written (docs/storage.md, "Two inserts").
--
-- Same columns as `events`, nothing stored: the views read each insert's block and the Null engine drops
-- it. The five rollups chained on these tables (migration 0015) follow them unchanged.
CREATE TABLE IF NOT EXISTS rollup_feed AS events ENGINE = Null;

-- A large flush (a backlog being read; consumers/consumer.py, TOGETHER_ROWS) feeds both in one insert,
-- into this table: its two views pass each block on to `events` (and so to its views) and to
-- `rollup_feed`, and the rows are parsed once. A later migration adding a column to `events` adds it to
-- both Null tables.
CREATE TABLE IF NOT EXISTS events_with_rollups AS events ENGINE = Null;
CREATE MATERIALIZED VIEW IF NOT EXISTS events_with_rollups_raw_mv TO events AS
SELECT * FROM events_with_rollups;
CREATE MATERIALIZED VIEW IF NOT EXISTS events_with_rollups_feed_mv TO rollup_feed AS
SELECT * FROM events_with_rollups;

-- Every event_id the rollups have counted, as `event_ids` is for `events` (migration 0005): a replay
-- after a crash between the two inserts finds the raw rows stored and these not, and feeds the rollups
-- only what they lack. Fed by a view, so written in the same insert with the same deduplication token.
-- Made as `event_ids` is now, its TTL included (which --retention-days may have changed from 90): the
-- ids copied below must live as long as their raw rows. Its retention row is added at the end.
CREATE TABLE IF NOT EXISTS rollup_ids AS event_ids;

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_ids_mv TO rollup_ids AS
SELECT event_id, start_time FROM rollup_feed;

DROP VIEW IF EXISTS events_by_hour_mv;
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
    sum(ifNull(rollup_feed.cost_usd, 0)) AS cost_usd,
    countIf(rollup_feed.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM rollup_feed
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

DROP VIEW IF EXISTS events_by_day_mv;
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
    sum(ifNull(rollup_feed.cost_usd, 0)) AS cost_usd,
    countIf(rollup_feed.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM rollup_feed
GROUP BY hour, account_id, gateway_id, model, endpoint, outcome;

DROP VIEW IF EXISTS gateways_by_hour_mv;
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
    sum(ifNull(rollup_feed.cost_usd, 0)) AS cost_usd,
    countIf(rollup_feed.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), rollup_feed.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM rollup_feed
GROUP BY hour, account_id, gateway_id;

DROP VIEW IF EXISTS keys_by_hour_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS keys_by_hour_mv TO keys_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    ifNull(rollup_feed.api_key_fingerprint, '') AS api_key_fingerprint,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    sum(ifNull(rollup_feed.cost_usd, 0)) AS cost_usd,
    countIf(rollup_feed.cost_usd IS NULL) AS unpriced_requests
FROM rollup_feed
GROUP BY hour, account_id, gateway_id, api_key_fingerprint;

DROP VIEW IF EXISTS metadata_by_hour_mv;
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
    sum(ifNull(rollup_feed.cost_usd, 0)) AS cost_usd,
    countIf(rollup_feed.cost_usd IS NULL) AS unpriced_requests
FROM rollup_feed
ARRAY JOIN arrayZip(mapKeys(metadata), mapValues(metadata)) AS kv
GROUP BY hour, account_id, gateway_id, key, value;

DROP VIEW IF EXISTS errors_by_hour_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS errors_by_hour_mv TO errors_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    outcome,
    ifNull(error_type, '') AS error_type,
    status_code,
    count() AS errors
FROM rollup_feed
WHERE outcome != 'ok'
GROUP BY hour, account_id, gateway_id, outcome, error_type, status_code;

DROP VIEW IF EXISTS cache_by_hour_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS cache_by_hour_mv TO cache_by_hour AS
SELECT
    toStartOfHour(start_time) AS hour,
    account_id,
    gateway_id,
    ifNull(model, '') AS model,
    countIf(cache_status IN ('HIT', 'MISS', 'EXPIRED')) AS lookups,
    countIf(cache_status = 'HIT') AS hits,
    sum(ifNull(rollup_feed.saved_input_tokens, 0)) AS saved_input_tokens,
    sum(ifNull(rollup_feed.saved_output_tokens, 0)) AS saved_output_tokens,
    sum(ifNull(rollup_feed.saved_cost_usd, 0)) AS saved_cost_usd,
    countIf(cache_status = 'HIT' AND rollup_feed.saved_cost_usd IS NULL) AS saved_cost_unknown
FROM rollup_feed
WHERE cache_status IS NOT NULL
GROUP BY hour, account_id, gateway_id, model;

-- Until this migration the rollups were written with `events`: every stored event is counted in them.
INSERT INTO rollup_ids SELECT event_id, start_time FROM event_ids;

INSERT INTO table_retention (table_name, setting, ttl_expression, days)
SELECT name, 'raw', 'toDateTime(start_time)', toUInt32(extract(engine_full, 'TTL .* \\+ toIntervalDay\\((\\d+)\\)'))
FROM system.tables
WHERE database = currentDatabase() AND name = 'rollup_ids';
