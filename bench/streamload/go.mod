module streamload

go 1.19
