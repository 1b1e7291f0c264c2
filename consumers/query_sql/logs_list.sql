-- One page of the logs API: newest first, ordered by (start_time, event_id) so a cursor (the last row's
-- pair, and the first page's `until`) continues exactly where the page ended however many events arrive
-- meanwhile. the WHERE placeholder is logs_filter.sql. Bodies are left out (GET /api/logs/<id> has them).
SELECT
    event_id, start_time, end_time, account_id, gateway_id, route_mode, api_version, endpoint, method,
    path, model, model_implied, stream, status_code, outcome, error_type, error_message, finish_reason,
    usage_input_tokens, usage_output_tokens, usage_cached_tokens, usage_search_units, usage_images,
    usage_image_tokens, latency_total_ms, latency_ttft_ms, cost_usd, cost_source, cache_status,
    api_key_fingerprint, metadata
FROM events
WHERE {filter}
  AND ({after_time:String} = ''
       OR (start_time, event_id) < (parseDateTime64BestEffortOrZero({after_time:String}, 3, 'UTC'),
                                    {after_id:String}))
ORDER BY start_time DESC, event_id DESC
LIMIT {limit:UInt32}
