"""Shipped data: the embedded toy model (`toy-model/`, diffusers layout) and its evaluator (`toy-evaluator/`)."""
