-- One row per time bucket (and group), from the per-minute aggregates; {step_s} a multiple of 60.
SELECT
    toStartOfInterval(minute, toIntervalSecond({step_s:UInt32})) AS bucket,
    multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
            {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
            {by:String} = 'outcome', outcome, '') AS key,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd,
    quantilesMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM events_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY bucket, key
ORDER BY bucket, key
