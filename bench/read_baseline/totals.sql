-- Totals per group over a window, from the per-minute aggregates (minute resolution).
-- {by} is one of account_id, gateway_id, model, endpoint, outcome, or 'none' for one total row.
-- cost_usd is the priced requests' cost, null when none was priced; unpriced_* say how much it leaves
-- out (docs/storage.md, "How each number is computed").
SELECT
    multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
            {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
            {by:String} = 'outcome', outcome, '') AS key,
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
    if(sum(events_by_minute.requests) = sum(events_by_minute.unpriced_requests), NULL,
       sum(events_by_minute.cost_usd)) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    sum(unpriced_input_tokens) AS unpriced_input_tokens,
    sum(unpriced_output_tokens) AS unpriced_output_tokens,
    sum(implied_model_requests) AS implied_model_requests,
    quantilesMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesMerge(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY key
ORDER BY requests DESC, key
