-- Retention as a setting the migrations manage: one row per table with a TTL, saying which setting
-- governs it (`raw`: --retention-days, `aggregate`: --aggregate-retention-days), its TTL expression and
-- the days in force. At start the consumer changes a table's TTL only where the configured days differ
-- from its row, and records the change here with its time (consumers/schema.py, apply_retention), so
-- this table, not a parse of the live DDL, says what retention is in force and since when. A later
-- migration that creates a table with a TTL adds its row the same way.
CREATE TABLE IF NOT EXISTS table_retention
(
    table_name String,
    setting LowCardinality(String),
    ttl_expression String,
    days UInt32,
    set_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(set_at)
ORDER BY table_name;

-- The days each table has now: the files' defaults on a new install; on an older one, what an earlier
-- consumer start rewrote them to. Run again after a crash, it inserts the same rows (folded by FINAL).
INSERT INTO table_retention (table_name, setting, ttl_expression, days)
SELECT t.name, r.setting, r.ttl_expression, toUInt32(extract(t.engine_full, 'TTL .* \\+ toIntervalDay\\((\\d+)\\)'))
FROM system.tables AS t
INNER JOIN (
    SELECT * FROM VALUES('name String, setting String, ttl_expression String',
        ('events', 'raw', 'toDateTime(start_time)'),
        ('event_ids', 'raw', 'toDateTime(start_time)'),
        ('event_feedback', 'raw', 'toDateTime(start_time)'),
        ('events_by_minute', 'aggregate', 'minute'),
        ('errors_by_minute', 'aggregate', 'minute'),
        ('cache_by_minute', 'aggregate', 'minute'),
        ('events_by_hour', 'aggregate', 'hour'),
        ('events_by_day', 'aggregate', 'hour'),
        ('gateways_by_hour', 'aggregate', 'hour'),
        ('keys_by_hour', 'aggregate', 'hour'),
        ('metadata_by_hour', 'aggregate', 'hour'))
) AS r ON t.name = r.name
WHERE t.database = currentDatabase();
