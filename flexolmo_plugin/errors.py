"""The one base class for refusals of user input.

Every error that means "the input (a file, a flag, a configuration) cannot be used" derives from
:class:`FlexOlmoError`; the ``flexolmo`` command prints its message on one line and exits 2.  Any
other exception is a bug in this package (or in a library it calls) and surfaces with its traceback,
so that an internal failure is never reported as the user's mistake.
"""

from __future__ import annotations


class FlexOlmoError(ValueError):
    """Input that FlexOlmo refuses (bad checkpoint, configuration, package, data, option...).

    A ``ValueError`` too, so that code catching the standard exception for bad values keeps working.
    """


class ConfigError(FlexOlmoError):
    """A configuration that FlexOlmo (or this implementation of it) cannot represent."""


class FlexOlmoWarning(Warning):
    """Something a user must see but that is not a refusal (e.g. inputs read without checksums, an
    export another runtime reads differently).  Not a UserWarning: the CLI silences those (library
    advisories) and prints these as one ``warning:`` line each."""
