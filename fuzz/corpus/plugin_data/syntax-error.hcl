keys_path = "/a"
"log_level" == "x"
foo {
