-- Heaviest values of one metadata key (cf-aig-metadata, e.g. user or team) over a window.
SELECT
    metadata[{key:String}] AS value,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(usage_search_units, 0)) AS search_units,
    sum(ifNull(usage_images, 0)) AS images,
    sum(ifNull(usage_image_tokens, 0)) AS image_tokens,
    -- null when no request of the group was priced (a sum over nulls only is null)
    sum(cost_usd) AS cost_usd,
    countIf(events.cost_usd IS NULL) AS unpriced_requests
FROM events
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND mapContains(metadata, {key:String})
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY value
ORDER BY cost_usd DESC NULLS LAST, requests DESC, value
LIMIT {limit:UInt32}
