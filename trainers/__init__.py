"""How each artifact is learned: one file per method on the shared loop in `base.py` (mapped to `studio.trainers`)."""
