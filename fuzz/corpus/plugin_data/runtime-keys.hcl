keys_path = "/tmp/keys.json"
log_level = "DEBUG"
max_keys = 10
max_signs_per_second = 500
metrics_listen = "[::1]:9988"
audit_log = "/var/log/spire/kms-audit.jsonl"
