-- The feedback last given on some events (the newest row of each). Ids travel hex-encoded and
-- comma-joined in one String (array parameters are not parsed alike by every backend).
SELECT event_id, feedback, score, metadata, updated_at
FROM event_feedback FINAL
WHERE event_id IN (SELECT arrayJoin(arrayMap(x -> unhex(x), splitByChar(',', {ids:String}))))
