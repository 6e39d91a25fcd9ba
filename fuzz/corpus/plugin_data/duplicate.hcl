keys_path = "/a"
keys_path = "/b"
