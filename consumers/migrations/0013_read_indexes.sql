-- Skip indexes for the filters of the raw-table reads (query_sql/logs_filter.sql, recent.sql): model,
-- endpoint, outcome, status code and cache status, none of them in the sort key (account, gateway,
-- time). Few distinct values per granule block, so `set` indexes: a block without the value asked for
-- is skipped. Key fingerprints and metadata keys and values have bloom filters since 0009. Parts written
-- before this migration get the indexes when merged; until then they are read, not skipped (the answers
-- are the same).
ALTER TABLE events
    ADD INDEX IF NOT EXISTS idx_model model TYPE set(256) GRANULARITY 4,
    ADD INDEX IF NOT EXISTS idx_endpoint endpoint TYPE set(64) GRANULARITY 4,
    ADD INDEX IF NOT EXISTS idx_outcome outcome TYPE set(16) GRANULARITY 4,
    ADD INDEX IF NOT EXISTS idx_status_code status_code TYPE set(64) GRANULARITY 4,
    ADD INDEX IF NOT EXISTS idx_cache_status cache_status TYPE set(8) GRANULARITY 4;

-- The logs filter's `feedback` (an event_id subquery over event_feedback by its last rating).
ALTER TABLE event_feedback
    ADD INDEX IF NOT EXISTS idx_feedback feedback TYPE set(3) GRANULARITY 4;
