"""Router tuning reuses the merged model of the expert tests."""

from tests.flexolmo_plugin.experts.helpers import world  # noqa: F401
