"""Cluster side: the embedded local stack, connecting to Ray, install tooling (env/)."""
