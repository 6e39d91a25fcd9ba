backend = "disk"
"keys_path" = "/k.json"
