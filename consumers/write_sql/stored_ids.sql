-- Which of a flush's event ids an id table holds (`event_ids` for the raw table, `rollup_ids` for the
-- rollups): the consumer leaves those rows out of that insert, so a duplicate never reaches its views. Ids travel as one comma-joined String (a 10k-id
-- array parameter costs ClickHouse about 40 ms to parse, this about 5 ms): ids of letters, digits and
-- `-_.:` as they are (every UUIDv7 the gateway makes), any other id hex-encoded in {hex}.
SELECT DISTINCT event_id
FROM {table:Identifier}
WHERE event_id IN (
    SELECT arrayJoin(arrayConcat(
        splitByChar(',', {plain:String}),
        arrayMap(x -> unhex(x), splitByChar(',', {hex:String}))
    ))
)
