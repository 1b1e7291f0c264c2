-- The retention in force, per table with a TTL (migration 0012).
SELECT table_name, setting, ttl_expression, days FROM table_retention FINAL ORDER BY table_name
