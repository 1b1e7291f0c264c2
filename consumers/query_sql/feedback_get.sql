-- The feedback last given on some events (the newest row of each).
SELECT event_id, feedback, score, metadata, updated_at
FROM event_feedback FINAL
WHERE event_id IN {ids:Array(String)}
