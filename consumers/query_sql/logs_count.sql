-- How many events the logs filter matches (the WHERE placeholder is logs_filter.sql): a delete's dry run.
SELECT count() AS events FROM events WHERE {filter}
