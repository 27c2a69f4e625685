"""The benchmarks behind `studio bench ...`, one module per command."""


def with_method_options(recipe: dict, options: dict) -> dict:
    """`TrainConfig` keyword arguments from a bench recipe (loop options, and method options under
    "method_options") with `options` added to its method options (over the recipe's).

    Example:
        >>> with_method_options({"max_train_steps": 250, "method_options": {"refine": True}}, {"concept": ["circle"]})
        {'max_train_steps': 250, 'method_options': {'refine': True, 'concept': ['circle']}}
    """
    return {**recipe, "method_options": {**recipe.get("method_options", {}), **options}}
