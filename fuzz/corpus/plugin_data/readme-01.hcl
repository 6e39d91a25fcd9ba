backend   = "disk"                         # the default
keys_path = "/opt/spire/data/server/keys.json"
log_level = "info"
