-- Errors by type and status over a window, with the window's request count (for rates).
WITH (
    SELECT sum(requests) FROM events_by_minute
    WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
      AND minute < {until:DateTime64(3, 'UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
) AS total
SELECT
    error_type,
    status_code,
    outcome,
    sum(errors) AS errors,
    any(total) AS requests
FROM errors_by_minute
WHERE minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})
  AND minute < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY error_type, status_code, outcome
ORDER BY errors DESC, error_type, status_code
