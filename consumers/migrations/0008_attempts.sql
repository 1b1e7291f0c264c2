-- Event schema 1.3, retries (docs/events.md): how many times the gateway sent a request upstream and each
-- attempt's status (0: no answer). For an exchange that never went upstream: null and empty.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS attempts Nullable(UInt8),
    ADD COLUMN IF NOT EXISTS attempt_statuses Array(UInt16);
