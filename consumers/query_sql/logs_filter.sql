-- The logs API's filter, shared by logs_list, logs_count, logs_delete and the export: an empty / 0
-- parameter matches all. `cached`: 'true' (a cache HIT) or 'false'; `feedback`: 1 or -1 as last given.
start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
  AND ({model:String} = '' OR model = {model:String})
  AND ({endpoint:String} = '' OR endpoint = {endpoint:String})
  AND ({outcome:String} = '' OR outcome = {outcome:String})
  AND ({status_code:UInt16} = 0 OR status_code = {status_code:UInt16})
  AND ({api_key_fingerprint:String} = '' OR api_key_fingerprint = {api_key_fingerprint:String})
  AND ({metadata_key:String} = '' OR metadata[{metadata_key:String}] = {metadata_value:String})
  AND ({cached:String} = '' OR (ifNull(cache_status, '') = 'HIT') = ({cached:String} = 'true'))
  AND ({feedback:Int8} = 0 OR event_id IN (
        SELECT event_id FROM event_feedback FINAL
        WHERE feedback = {feedback:Int8}
          AND start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}))
