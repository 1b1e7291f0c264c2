-- One event, every stored column (bodies included), for the dashboard's detail view.
SELECT *
FROM events FINAL
WHERE event_id = {event_id:String}
LIMIT 1
