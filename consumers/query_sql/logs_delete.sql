-- Erase the events the logs filter matches (the WHERE placeholder is logs_filter.sql). A lightweight delete, waited
-- for, so a count right after it sees the rows gone. The aggregates keep their counts (they hold no
-- payload, metadata or key fingerprint), and `event_ids` keeps the ids so a replayed copy is still
-- recognised as a duplicate instead of coming back.
DELETE FROM events WHERE {filter}
SETTINGS lightweight_deletes_sync = 2, mutations_sync = 2
