"""Data plane: webdataset shards, the sample dataset, Ray Data readers."""
