"""A public anchor, three owners who trained only their own expert, their packages, and the merge."""

from tests.flexolmo_plugin.experts.helpers import world  # noqa: F401
