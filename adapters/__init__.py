"""What attaches to a pipeline at inference time: one file per method (mapped to `studio.adapters`)."""
