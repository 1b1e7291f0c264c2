-- totals.sql over a window holding at least one whole hour: whole days from a day table, the whole hours
-- around them from an hour table (consumers.queries.Levels.params picks the smallest that answers), the
-- ragged minutes at both ends from events_by_minute, so every count is as exact as per minute.
-- Boundaries come from consumers.queries.Levels: minutes in [since, h0) and [h1, until), hours in
-- [h0, d0) and [d1, h1), days in [d0, d1). Latency and TTFT quantiles merge the hour and day t-digests,
-- i.e. the whole hours of the window.
SELECT
    key,
    sum(n_requests) AS requests,
    sum(n_errors) AS errors,
    sum(n_streams) AS streams,
    sum(n_input_tokens) AS input_tokens,
    sum(n_output_tokens) AS output_tokens,
    sum(n_cached_tokens) AS cached_tokens,
    sum(n_search_units) AS search_units,
    sum(n_classifications) AS classifications,
    sum(n_embeddings) AS embeddings,
    sum(n_images) AS images,
    sum(n_image_tokens) AS image_tokens,
    if(sum(n_requests) = sum(n_unpriced_requests), NULL, sum(n_cost)) AS cost_usd,
    sum(n_unpriced_requests) AS unpriced_requests,
    sum(n_unpriced_input_tokens) AS unpriced_input_tokens,
    sum(n_unpriced_output_tokens) AS unpriced_output_tokens,
    sum(n_implied_model_requests) AS implied_model_requests,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(lat) AS latency_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(ttft) AS ttft_ms
FROM
(
    SELECT
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
                {by:String} = 'outcome', outcome, '') AS key,
        sum(requests) AS n_requests, sum(errors) AS n_errors, sum(streams) AS n_streams,
        sum(input_tokens) AS n_input_tokens, sum(output_tokens) AS n_output_tokens,
        sum(cached_tokens) AS n_cached_tokens, sum(search_units) AS n_search_units,
        sum(classifications) AS n_classifications, sum(embeddings) AS n_embeddings, sum(images) AS n_images,
        sum(image_tokens) AS n_image_tokens, sum(cost_usd) AS n_cost, sum(unpriced_requests) AS n_unpriced_requests,
        sum(unpriced_input_tokens) AS n_unpriced_input_tokens,
        sum(unpriced_output_tokens) AS n_unpriced_output_tokens,
        sum(implied_model_requests) AS n_implied_model_requests,
        quantilesTDigestStateIf(0.5, 0.95, 0.99)(toFloat64(0), false) AS lat,
        quantilesTDigestStateIf(0.5, 0.95, 0.99)(toFloat64(0), false) AS ttft
    FROM events_by_minute
    WHERE ((minute >= {since:DateTime('UTC')} AND minute < {h0:DateTime('UTC')})
           OR (minute >= {h1:DateTime('UTC')} AND minute < {until:DateTime('UTC')}))
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY key
    UNION ALL
    SELECT
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
                {by:String} = 'outcome', outcome, '') AS key,
        sum(requests), sum(errors), sum(streams), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
        sum(search_units), sum(classifications), sum(embeddings), sum(images), sum(image_tokens),
        sum(cost_usd), sum(unpriced_requests), sum(unpriced_input_tokens), sum(unpriced_output_tokens),
        sum(implied_model_requests),
        quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms),
        quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms)
    FROM {hours:Identifier}
    WHERE ((hour >= {h0:DateTime('UTC')} AND hour < {d0:DateTime('UTC')})
           OR (hour >= {d1:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}))
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY key
    UNION ALL
    SELECT
        multiIf({by:String} = 'account_id', account_id, {by:String} = 'gateway_id', gateway_id,
                {by:String} = 'model', model, {by:String} = 'endpoint', endpoint,
                {by:String} = 'outcome', outcome, '') AS key,
        sum(requests), sum(errors), sum(streams), sum(input_tokens), sum(output_tokens), sum(cached_tokens),
        sum(search_units), sum(classifications), sum(embeddings), sum(images), sum(image_tokens),
        sum(cost_usd), sum(unpriced_requests), sum(unpriced_input_tokens), sum(unpriced_output_tokens),
        sum(implied_model_requests),
        quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_ms),
        quantilesTDigestMergeState(0.5, 0.95, 0.99)(ttft_ms)
    FROM {days:Identifier}
    WHERE hour >= {d0:DateTime('UTC')} AND hour < {d1:DateTime('UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY key
)
GROUP BY key
ORDER BY requests DESC, key
