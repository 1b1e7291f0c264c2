-- Feedback on an event (the logs API, docs/api.md): thumbs up/down, a score, extra metadata, stored beside
-- the event instead of rewriting it. Each PATCH writes a whole new row (the previous one merged with the
-- change); the latest `updated_at` wins. The event's time, account, gateway and model are copied in, so
-- feedback per model and gateway is read from this table alone, and it leaves with the event's retention.
CREATE TABLE IF NOT EXISTS event_feedback
(
    event_id String,
    start_time DateTime64(3, 'UTC'),
    account_id LowCardinality(String),
    gateway_id LowCardinality(String),
    model LowCardinality(String),
    feedback Int8,
    score Nullable(UInt8),
    metadata Map(String, String),
    updated_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY event_id
TTL toDateTime(start_time) + toIntervalDay(90);
