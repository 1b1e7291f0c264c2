-- Feedback per model or gateway over a window, from event_feedback alone (it carries the event's time
-- and scope): thumbs up, thumbs down, rated events and their mean score.
SELECT
    multiIf({by:String} = 'gateway_id', gateway_id, {by:String} = 'account_id', account_id, model) AS key,
    countIf(feedback = 1) AS positive,
    countIf(feedback = -1) AS negative,
    count(score) AS scored,
    avg(score) AS mean_score
FROM event_feedback FINAL
WHERE start_time >= {since:DateTime64(3, 'UTC')} AND start_time < {until:DateTime64(3, 'UTC')}
  AND ({account_id:String} = '' OR account_id = {account_id:String})
  AND ({gateway_id:String} = '' OR gateway_id = {gateway_id:String})
GROUP BY key
ORDER BY positive + negative DESC, key
