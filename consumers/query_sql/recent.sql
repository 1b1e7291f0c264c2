-- The latest requests matching the filters (an empty filter matches all). Bodies are left out.
SELECT
    event_id, start_time, end_time, account_id, gateway_id, route_mode, api_version, endpoint, method,
    path, model, model_implied, stream, status_code, outcome, error_type, error_message, finish_reason,
    usage_input_tokens, usage_output_tokens, usage_cached_tokens, usage_search_units, usage_images,
    usage_image_tokens, latency_total_ms, latency_ttft_ms, cost_usd, cost_source,
    api_key_fingerprint, metadata
FROM events
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
  AND ({model:String} = '' OR model = {model:String})
  AND ({endpoint:String} = '' OR endpoint = {endpoint:String})
  AND ({outcome:String} = '' OR outcome = {outcome:String})
  AND ({status_code:UInt16} = 0 OR status_code = {status_code:UInt16})
  AND ({metadata_key:String} = '' OR metadata[{metadata_key:String}] = {metadata_value:String})
ORDER BY start_time DESC, event_id
LIMIT {limit:UInt32}
