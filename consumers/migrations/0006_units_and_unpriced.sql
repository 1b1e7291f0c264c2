-- Event contract 1.1 (docs/events.md): every unit Cohere bills is stored (`usage.images`,
-- `usage.image_tokens` beside the others), and whether the model was implied (the request named none and
-- Cohere used its default, which the gateway priced). The nested `usage` grows two elements; the flat
-- columns take their values from it as in migration 0004.
ALTER TABLE events
    MODIFY COLUMN usage Tuple(
        input_tokens Nullable(UInt64),
        output_tokens Nullable(UInt64),
        raw_input_tokens Nullable(UInt64),
        raw_output_tokens Nullable(UInt64),
        cached_tokens Nullable(UInt64),
        search_units Nullable(UInt64),
        classifications Nullable(UInt64),
        embeddings Nullable(UInt64),
        images Nullable(UInt64),
        image_tokens Nullable(UInt64)
    ) EPHEMERAL;

ALTER TABLE events
    ADD COLUMN IF NOT EXISTS usage_images Nullable(UInt64) DEFAULT usage.images AFTER usage_embeddings,
    ADD COLUMN IF NOT EXISTS usage_image_tokens Nullable(UInt64) DEFAULT usage.image_tokens AFTER usage_images,
    ADD COLUMN IF NOT EXISTS model_implied Bool DEFAULT false AFTER model;

-- Unknown cost stays unknown: `cost_usd` sums the priced requests only, and the unpriced ones are counted
-- (requests, and their tokens), so a total says "cost incomplete" instead of passing a null as $0.
-- Rows written before this migration have 0 unpriced requests: they were summed as before (a null
-- counted as 0), which is all that can be said of them now.
ALTER TABLE events_by_minute
    ADD COLUMN IF NOT EXISTS unpriced_requests SimpleAggregateFunction(sum, UInt64) AFTER cost_usd,
    ADD COLUMN IF NOT EXISTS unpriced_input_tokens SimpleAggregateFunction(sum, UInt64) AFTER unpriced_requests,
    ADD COLUMN IF NOT EXISTS unpriced_output_tokens SimpleAggregateFunction(sum, UInt64) AFTER unpriced_input_tokens,
    ADD COLUMN IF NOT EXISTS implied_model_requests SimpleAggregateFunction(sum, UInt64) AFTER unpriced_output_tokens,
    ADD COLUMN IF NOT EXISTS cached_tokens SimpleAggregateFunction(sum, UInt64) AFTER output_tokens,
    ADD COLUMN IF NOT EXISTS search_units SimpleAggregateFunction(sum, UInt64) AFTER cached_tokens,
    ADD COLUMN IF NOT EXISTS classifications SimpleAggregateFunction(sum, UInt64) AFTER search_units,
    ADD COLUMN IF NOT EXISTS embeddings SimpleAggregateFunction(sum, UInt64) AFTER classifications,
    ADD COLUMN IF NOT EXISTS images SimpleAggregateFunction(sum, UInt64) AFTER embeddings,
    ADD COLUMN IF NOT EXISTS image_tokens SimpleAggregateFunction(sum, UInt64) AFTER images;

-- The view again with the new columns. Between these two statements an insert would miss the view; the
-- consumer migrates before it consumes, so only another consumer sharing the server could write then.
DROP VIEW IF EXISTS events_by_minute_mv;

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
    sum(ifNull(usage_cached_tokens, 0)) AS cached_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_classifications, 0)) AS classifications,
    sum(ifNull(usage_embeddings, 0)) AS embeddings,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    -- The priced requests' cost (a null adds nothing); the read side shows null when none was priced.
    sum(ifNull(events.cost_usd, 0)) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests,
    sumIf(ifNull(usage_input_tokens, 0), events.cost_usd IS NULL) AS unpriced_input_tokens,
    sumIf(ifNull(usage_output_tokens, 0), events.cost_usd IS NULL) AS unpriced_output_tokens,
    countIf(model_implied) AS implied_model_requests,
    quantilesState(0.5, 0.95, 0.99)(latency_total_ms) AS latency_ms,
    quantilesStateIf(0.5, 0.95, 0.99)(ifNull(latency_ttft_ms, 0), latency_ttft_ms IS NOT NULL) AS ttft_ms
FROM events
GROUP BY minute, account_id, gateway_id, model, endpoint, outcome;
