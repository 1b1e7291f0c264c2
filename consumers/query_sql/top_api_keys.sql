-- Heaviest API keys (by fingerprint; keys themselves are never stored) over a window.
SELECT
    ifNull(api_key_fingerprint, '') AS api_key_fingerprint,
    count() AS requests,
    countIf(outcome != 'ok') AS errors,
    sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
    sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
    sum(ifNull(cost_usd, 0)) AS cost_usd
FROM events FINAL
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY api_key_fingerprint
ORDER BY cost_usd DESC, requests DESC, api_key_fingerprint
LIMIT {limit:UInt32}
