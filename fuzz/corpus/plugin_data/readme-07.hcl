backend              = "aws_kms"          # the new (target) store
region               = "us-east-1"
key_identifier_value = "server-a"
migrate_from {                            # the old store, as its own plugin_data had it
  backend   = "disk"
  keys_path = "/opt/spire/data/server/keys.json"
}
