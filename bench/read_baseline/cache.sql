-- Response cache hit rate and savings per group over a window, from cache_by_minute (migration 0010).
-- {by} is one of account_id, gateway_id, model, or 'none' for one total row.
SELECT
    multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
            {by:String} = 'model', model, '') AS key,
    sum(lookups) AS lookups,
    sum(hits) AS hits,
    sum(saved_input_tokens) AS saved_input_tokens,
    sum(saved_output_tokens) AS saved_output_tokens,
    sum(saved_cost_usd) AS saved_cost_usd,
    sum(saved_cost_unknown) AS saved_cost_unknown
FROM cache_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY key
ORDER BY hits DESC, key
