-- timeseries.sql for a step of whole hours: events_by_hour for the window's whole hours, the ragged
-- minutes at both ends ([since, h0) and [h1, until), consumers.queries.Levels) from events_by_minute, so
-- every count is exact; latency quantiles from the hours' t-digests.
SELECT
    bucket,
    key,
    sum(n_requests) AS requests,
    sum(n_errors) AS errors,
    sum(n_input_tokens) AS input_tokens,
    sum(n_output_tokens) AS output_tokens,
    sum(n_cached_tokens) AS cached_tokens,
    sum(n_search_units) AS search_units,
    sum(n_images) AS images,
    sum(n_image_tokens) AS image_tokens,
    if(sum(n_requests) = sum(n_unpriced_requests), NULL, sum(n_cost)) AS cost_usd,
    sum(n_unpriced_requests) AS unpriced_requests,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(lat) AS latency_ms
FROM
(
    SELECT
        toStartOfInterval(minute, toIntervalSecond({step_s:UInt32})) AS bucket,
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
                {by:String} = 'outcome', outcome, '') AS key,
        sum(requests) AS n_requests, sum(errors) AS n_errors, sum(input_tokens) AS n_input_tokens,
        sum(output_tokens) AS n_output_tokens, sum(cached_tokens) AS n_cached_tokens,
        sum(search_units) AS n_search_units, sum(images) AS n_images, sum(image_tokens) AS n_image_tokens,
        sum(cost_usd) AS n_cost, sum(unpriced_requests) AS n_unpriced_requests,
        quantilesTDigestStateIf(0.5, 0.95, 0.99)(toFloat64(0), false) AS lat
    FROM events_by_minute
    WHERE ((minute >= {since:DateTime('UTC')} AND minute < {h0:DateTime('UTC')})
           OR (minute >= {h1:DateTime('UTC')} AND minute < {until:DateTime('UTC')}))
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY bucket, key
    UNION ALL
    SELECT
        toStartOfInterval(hour, toIntervalSecond({step_s:UInt32})) AS bucket,
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
                {by:String} = 'outcome', outcome, '') AS key,
        sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
        sum(search_units), sum(images), sum(image_tokens), sum(cost_usd), sum(unpriced_requests),
        quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms)
    FROM {hours:Identifier}
    WHERE hour >= {h0:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY bucket, key
)
GROUP BY bucket, key
ORDER BY bucket, key
