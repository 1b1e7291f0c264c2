-- Which of a flush's event ids are already stored: the consumer leaves those rows out of its insert, so
-- a duplicate never reaches the materialized views. Ids travel as one comma-joined String (a 10k-id
-- array parameter costs ClickHouse about 40 ms to parse, this about 5 ms): ids of letters, digits and
-- `-_.:` as they are (every UUIDv7 the gateway makes), any other id hex-encoded in {hex}.
SELECT DISTINCT event_id
FROM event_ids
WHERE event_id IN (
    SELECT arrayJoin(arrayConcat(
        splitByChar(',', {plain:String}),
        arrayMap(x -> unhex(x), splitByChar(',', {hex:String}))
    ))
)
