-- The consumer's intent log: before inserting a batch it records the offset range it is about to write.
-- After a crash (insert done, commit not), whoever owns the partition next cuts the same range again,
-- so the re-insert carries the same deduplication token and is a no-op. See docs/storage.md.
CREATE TABLE IF NOT EXISTS consumer_batches
(
    topic LowCardinality(String),
    partition UInt32,
    first_offset UInt64,
    last_offset UInt64,
    first_timestamp_ms Int64,
    written_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, first_offset)
TTL toDateTime(written_at) + toIntervalDay(14);
