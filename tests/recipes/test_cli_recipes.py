"""The command line lists exactly the recipes the runner knows (it cannot import Bridge for --help)."""


def test_cli_recipe_choices_match_the_runner():
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.recipes.production import PRODUCTION_RECIPES
    from flexolmo_plugin.recipes.train import _recipes

    from flexolmo_plugin.cli import TRAIN_RECIPES

    assert sorted(TRAIN_RECIPES) == sorted({**_recipes(), **PRODUCTION_RECIPES})
