-- One PATCH: the event's whole feedback row as it now stands (consumers.logs.patch merged the change in).
INSERT INTO event_feedback (event_id, start_time, account_id, gateway_id, model, feedback, score, metadata,
    updated_at)
VALUES ({event_id:String}, {start_time:DateTime64(3, 'UTC')}, {account_id:String}, {gateway_id:String},
    {model:String}, {feedback:Int8}, {score:Nullable(UInt8)}, {metadata:Map(String, String)}, now64(6))
