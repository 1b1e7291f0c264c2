-- The insert intents of one partition from an offset on (consumers/batching.py): what a consumer that
-- takes the partition over must insert again with the same deduplication tokens.
SELECT topic, partition, first_offset, last_offset, first_timestamp_ms
FROM consumer_batches FINAL
WHERE topic = {topic:String} AND partition = {partition:UInt32} AND first_offset >= {from_offset:UInt64}
ORDER BY first_offset
