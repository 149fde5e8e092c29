"""UniLIP model library and the `unilip` command line (no Ray in model code)."""
