-- One row per time bucket (and group), from the per-minute aggregates; {step_s} a multiple of 60.
-- cost_usd as in totals.sql: the priced requests' cost, null when none was priced.
SELECT
    toStartOfInterval(minute, toIntervalSecond({step_s:UInt32})) AS bucket,
    multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
            {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
            {by:String} = 'outcome', outcome, '') AS key,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(search_units) AS search_units,
    sum(images) AS images,
    sum(image_tokens) AS image_tokens,
    if(sum(events_by_minute.requests) = sum(events_by_minute.unpriced_requests), NULL,
       sum(events_by_minute.cost_usd)) AS cost_usd,
    sum(unpriced_requests) AS unpriced_requests,
    quantilesMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM events_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY bucket, key
ORDER BY bucket, key
