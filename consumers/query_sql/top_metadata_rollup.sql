-- top_metadata.sql over a window holding a whole hour: metadata_by_hour for the whole hours [h0, h1),
-- raw events for the ragged ends [since, h0) and [h1, until) (consumers.queries.Levels): exact counts.
SELECT
    value,
    sum(n_requests) AS requests,
    sum(n_errors) AS errors,
    sum(n_input_tokens) AS input_tokens,
    sum(n_output_tokens) AS output_tokens,
    sum(n_search_units) AS search_units,
    sum(n_images) AS images,
    sum(n_image_tokens) AS image_tokens,
    -- null when no request of the group was priced
    if(sum(n_requests) = sum(n_unpriced), NULL, sum(n_cost)) AS cost_usd,
    sum(n_unpriced) AS unpriced_requests
FROM
(
    SELECT
        metadata[{key:String}] AS value,
        count() AS n_requests, countIf(outcome != 'ok') AS n_errors,
        sum(ifNull(usage_input_tokens, 0)) AS n_input_tokens, sum(ifNull(usage_output_tokens, 0)) AS n_output_tokens,
        sum(ifNull(usage_search_units, 0)) AS n_search_units, sum(ifNull(usage_images, 0)) AS n_images,
        sum(ifNull(usage_image_tokens, 0)) AS n_image_tokens, sum(ifNull(cost_usd, 0)) AS n_cost,
        countIf(cost_usd IS NULL) AS n_unpriced
    FROM events
    WHERE ((start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {h0:DateTime('UTC')})
           OR (start_time >= {h1:DateTime('UTC')} AND start_time < {until:DateTime64(3, 'UTC')}))
      AND mapContains(metadata, {key:String})
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY value
    UNION ALL
    SELECT value, sum(requests), sum(errors), sum(input_tokens), sum(output_tokens),
        sum(search_units), sum(images), sum(image_tokens), sum(cost_usd), sum(unpriced_requests)
    FROM metadata_by_hour
    WHERE key = {key:String} AND hour >= {h0:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY value
)
GROUP BY value
ORDER BY cost_usd DESC NULLS LAST, requests DESC, value
LIMIT {limit:UInt32}
