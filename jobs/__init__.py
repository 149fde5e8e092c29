"""Jobs: the demo, training recipes and (later) the Ray Train loop."""
