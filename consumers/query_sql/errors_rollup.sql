-- errors.sql over a window holding at least one whole hour: whole hours from errors_by_hour (and the
-- request total from gateways_by_hour), the ragged minutes at both ends ([since, h0) and [h1, until),
-- consumers.queries.Levels) from the per-minute tables, so every count is as exact as per minute.
WITH (
    SELECT sum(requests) FROM
    (
        SELECT sum(requests) AS requests FROM events_by_minute
        WHERE ((minute >= {since:DateTime('UTC')} AND minute < {h0:DateTime('UTC')})
               OR (minute >= {h1:DateTime('UTC')} AND minute < {until:DateTime('UTC')}))
          AND ({account_id:String} = '' OR account_id = {account_id:String})
          AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
        UNION ALL
        SELECT sum(requests) FROM gateways_by_hour
        WHERE hour >= {h0:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}
          AND ({account_id:String} = '' OR account_id = {account_id:String})
          AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    )
) AS total
SELECT
    error_type,
    status_code,
    outcome,
    sum(n) AS errors,
    any(total) AS requests
FROM
(
    SELECT error_type, status_code, outcome, sum(errors) AS n
    FROM errors_by_minute
    WHERE ((minute >= {since:DateTime('UTC')} AND minute < {h0:DateTime('UTC')})
           OR (minute >= {h1:DateTime('UTC')} AND minute < {until:DateTime('UTC')}))
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY error_type, status_code, outcome
    UNION ALL
    SELECT error_type, status_code, outcome, sum(errors)
    FROM errors_by_hour
    WHERE hour >= {h0:DateTime('UTC')} AND hour < {h1:DateTime('UTC')}
      AND ({account_id:String} = '' OR account_id = {account_id:String})
      AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
    GROUP BY error_type, status_code, outcome
)
GROUP BY error_type, status_code, outcome
ORDER BY errors DESC, error_type, status_code
