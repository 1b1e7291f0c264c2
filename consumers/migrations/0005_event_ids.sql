-- Every event_id stored in `events`, ordered by id: the consumer looks the ids of a batch up here and
-- leaves out those already stored before it inserts, so a duplicate (the same event at another Kafka
-- offset, e.g. a spool replay hours later) never reaches the materialized views (docs/storage.md,
-- "Duplicates"). Ordered by the id alone: event ids are UUIDv7, so one batch's ids sit in few granules
-- and the lookup reads little whatever the batch's time span. Fed by a view so it is written in the same
-- insert as `events`, with the same deduplication token. Same TTL as `events` (schema.apply_retention).
CREATE TABLE IF NOT EXISTS event_ids
(
    event_id String,
    start_time DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY event_id
TTL toDateTime(start_time) + toIntervalDay(90)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS event_ids_mv TO event_ids AS
SELECT event_id, start_time FROM events;

-- Ids stored before this migration (no DISTINCT: on a large table it would hold every id in memory; the
-- engine folds repeats, as it does when this runs again).
INSERT INTO event_ids SELECT event_id, start_time FROM events;
