"""The recipe registry: one list, every name resolves to a recipe function, the CLI offers exactly it."""


def test_every_registered_recipe_resolves_and_the_cli_offers_exactly_them():
    import inspect

    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.cli import TRAIN_RECIPES
    from flexolmo_plugin.recipes.registry import RECIPES, recipe

    assert TRAIN_RECIPES == tuple(RECIPES)
    for name in RECIPES:
        function = recipe(name)
        assert callable(function) and function.__name__.startswith("flexolmo_")
        parameters = inspect.signature(function).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), name  # recipe.ARG=VALUE only
