"""A run folder: its files and layout, the checkpoints in it, and resuming it from itself."""
