-- Heaviest API keys (by fingerprint; keys themselves are never stored) over a window.
SELECT
    ifNull(api_key_fingerprint, '') AS api_key_fingerprint,
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
FROM events FINAL
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY api_key_fingerprint
ORDER BY cost_usd DESC NULLS LAST, requests DESC, api_key_fingerprint
LIMIT {limit:UInt32}
