-- One budget's use, recomputed from the raw events the way the gateway counts it (docs/gateway.md,
-- "Budgets"): the events of the gateways {gateways} (comma-separated) of one account under the budget, per
-- counter of its key ({key}: gateway, account, model, api_key or metadata.NAME, {meta} being NAME), the
-- spend of [since, split) and of [split, until). The caller weights the first part (rolling budgets;
-- for a period since = split). Requests of unknown cost are counted apart, never as $0.
SELECT
    if({key:String} = 'account', '', gateway_id) AS gateway,
    multiIf({key:String} IN ('account', 'gateway'), '',
            {key:String} = 'model', ifNull(model, ''),
            {key:String} = 'api_key', ifNull(api_key_fingerprint, ''),
            metadata[{meta:String}]) AS value,
    sumIf(ifNull(cost_usd, 0), start_time < {split:DateTime64(3, 'UTC')}) AS before_usd,
    sumIf(ifNull(cost_usd, 0), start_time >= {split:DateTime64(3, 'UTC')}) AS current_usd,
    countIf(cost_usd IS NULL AND start_time < {split:DateTime64(3, 'UTC')}) AS before_unpriced,
    countIf(cost_usd IS NULL AND start_time >= {split:DateTime64(3, 'UTC')}) AS current_unpriced,
    countIf(start_time >= {split:DateTime64(3, 'UTC')}) AS requests
FROM events
WHERE account_id = {account_id:String}
  AND has(splitByChar(',', {gateways:String}), gateway_id)
  AND start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({key:String} != 'api_key' OR api_key_fingerprint IS NOT NULL)
  AND ({meta:String} = '' OR mapContains(metadata, {meta:String}))
GROUP BY gateway, value
ORDER BY gateway, value
