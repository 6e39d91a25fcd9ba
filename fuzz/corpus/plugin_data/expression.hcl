keys_path = upper("x")
log_level = 1 + 2
