-- One event, every stored column (bodies included), for the dashboard's detail view. The id alone would
-- read every row (it is last in the sort key): `event_ids` (ordered by id) gives its start time, which
-- prunes to one partition and a narrow key range, and [lo, hi) (from the time inside a UUIDv7 id,
-- consumers.queries.event) bounds the partitions before that lookup runs. No FINAL: raw rows are
-- distinct (docs/storage.md, "Duplicates").
SELECT *
FROM events
WHERE event_id = {event_id:String}
  AND start_time >= {lo:DateTime64(3, 'UTC')} AND start_time < {hi:DateTime64(3, 'UTC')}
  AND start_time IN (SELECT start_time FROM event_ids WHERE event_id = {event_id:String})
LIMIT 1
