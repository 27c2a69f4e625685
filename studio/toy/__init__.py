"""ShapesWorld: the procedural toy world, its renderer, captions, evaluator network and pretraining recipe."""
