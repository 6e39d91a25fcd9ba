backend              = "aws_kms"
region               = "us-east-2"
key_identifier_file  = "/opt/spire/data/server/kms_server_id"
key_policy_file      = "/opt/spire/conf/server/kms_key_policy.json"
key_tags             = { team = "pki" }
