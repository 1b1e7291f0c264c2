-- The gateways with events since the earliest start of a budget window (their budgets are resolved from
-- the gateway configuration file by consumers/queries.py).
SELECT DISTINCT account_id, gateway_id
FROM events
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
ORDER BY account_id, gateway_id
