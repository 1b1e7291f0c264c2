-- cache.sql over a window holding at least one whole hour: whole hours from cache_by_hour, the ragged
-- minutes at both ends ([since, h0) and [h1, until), consumers.queries.Levels) from cache_by_minute, so
-- every count is as exact as per minute.
SELECT
    key,
    sum(n_lookups) AS lookups,
    sum(n_hits) AS hits,
    sum(n_saved_input_tokens) AS saved_input_tokens,
    sum(n_saved_output_tokens) AS saved_output_tokens,
    sum(n_saved_cost_usd) AS saved_cost_usd,
    sum(n_saved_cost_unknown) AS saved_cost_unknown
FROM
(
    SELECT
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, '') AS key,
        sum(lookups) AS n_lookups, sum(hits) AS n_hits, sum(saved_input_tokens) AS n_saved_input_tokens,
        sum(saved_output_tokens) AS n_saved_output_tokens, sum(saved_cost_usd) AS n_saved_cost_usd,
        sum(saved_cost_unknown) AS n_saved_cost_unknown
    FROM cache_by_minute
    WHERE ((minute >= {since:DateTime('UTC')} AND minute < {h0:DateTime('UTC')})
           OR (minute >= {h1:DateTime('UTC')} AND minute < {until:DateTime('UTC')}))
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY key
    UNION ALL
    SELECT
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, '') AS key,
        sum(lookups), sum(hits), sum(saved_input_tokens), sum(saved_output_tokens), sum(saved_cost_usd),
        sum(saved_cost_unknown)
    FROM cache_by_hour
    WHERE hour >= {h0:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY key
)
GROUP BY key
ORDER BY hits DESC, key
