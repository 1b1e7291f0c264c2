-- Totals per group over a window, from the per-minute aggregates (minute resolution).
-- {by} is one of account_id, gateway_id, model, endpoint, outcome, or 'none' for one total row.
SELECT
    multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
            {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
            {by:String} = 'outcome', outcome, '') AS key,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(streams) AS streams,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd,
    quantilesMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_ms,
    quantilesMerge(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms
FROM events_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY key
ORDER BY requests DESC, key
