INSERT INTO table_retention (table_name, setting, ttl_expression, days)
VALUES ({table_name:String}, {setting:String}, {ttl_expression:String}, {days:UInt32})
