-- A table's new retention. The placeholders are filled from `table_retention` (written by migrations,
-- never by a client) and a whole number of days: identifiers and a TTL expression cannot be parameters,
-- and a typed parameter would stay in the table's DDL as a cast.
ALTER TABLE {table} MODIFY TTL {ttl_expression} + toIntervalDay({days})
