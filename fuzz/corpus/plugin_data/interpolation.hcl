keys_path = "${var.x}"
