-- Event schema 1.2, the gateway's response cache (docs/events.md): each event's cache status and, for a
-- HIT (not billed: usage empty, cost 0), what the stored answer would have cost.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS cache_status LowCardinality(Nullable(String)),
    ADD COLUMN IF NOT EXISTS saved_input_tokens Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS saved_output_tokens Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS saved_search_units Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS saved_cost_usd Nullable(Float64);

-- Hit rate and savings per gateway and model, per minute, without scanning raw events. Only events
-- the cache applied to (cache_status set) land here; hits are HIT rows.
CREATE TABLE IF NOT EXISTS cache_by_minute
(
    minute DateTime('UTC'),
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
PARTITION BY toDate(minute)
ORDER BY (account_id, gateway_id, minute, model)
TTL minute + toIntervalDay(400)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS cache_by_minute_mv TO cache_by_minute AS
SELECT
    toStartOfMinute(start_time) AS minute,
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
GROUP BY minute, account_id, gateway_id, model;
