backend = "disk"
keys_path = <<-EOF
  /x
  EOF
log_level = "%{if true}x%{endif}"
