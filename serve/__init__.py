"""Ray Serve application for the unified model (HTTP endpoints)."""
