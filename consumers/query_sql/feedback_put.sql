-- One PATCH: the event's whole feedback row as it now stands (consumers.logs.patch merged the change in).
-- score -1 is "no score"; metadata travels as a JSON object.
INSERT INTO event_feedback (event_id, start_time, account_id, gateway_id, model, feedback, score, metadata,
    updated_at)
SELECT {event_id:String}, {start_time:DateTime64(3, 'UTC')}, {account_id:String}, {gateway_id:String},
    {model:String}, {feedback:Int8}, if({score:Int16} < 0, NULL, toUInt8({score:Int16})),
    JSONExtract({metadata:String}, 'Map(String, String)'), now64(6)
