"backend" = "aws_kms"
"region" = "us-east-1"
"key_identifier_value" = "server-a"
"access_key_id" = "AKIAFUZZEXAMPLE"
"secret_access_key" = "fuzzSecretValue123"
"key_tags" = {
  "team" = "pki"
}
