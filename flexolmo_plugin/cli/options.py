"""Parse-time checks of the ``flexolmo`` command line's option values.

Each function here is an argparse ``type=``: it turns the text into the value or raises
:class:`argparse.ArgumentTypeError`, which argparse reports as ``argument --FLAG: MESSAGE`` -- so a
bad number or name is refused before anything is imported or read, in one line that names the flag.
Bounds that the library can only know from a checkpoint (``--top-k`` at most the number of experts,
``--expert`` below it) are checked there; here only what no value of the input could make valid.
"""

from __future__ import annotations

import argparse
import math
import re

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_SEED = 2**32 - 1  # numpy / scikit-learn seeds (torch accepts more, they do not)
# The largest router logit scale (calibrate-router --scale, scale-router --grid): already far sharper than
# hard routing (the defaults are 2 and 1-9); beyond it the logits overflow fp32 and the model's activations
# become NaN, which would be reported as a broken model.  Equal to router_calibration.MAX_SCALE.
MAX_ROUTER_SCALE = 1e3
_SIZE_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}


class UsageError(Exception):
    """A command line argparse refuses; :func:`flexolmo_plugin.cli.main` prints it on one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that an error raises :class:`UsageError` instead of printing the
    usage and calling ``sys.exit(2)``: ``main()`` then reports it like every other refusal (one
    ``error:`` line, exit code 2 returned, not raised), for in-process callers as for the console."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count that cannot be zero: ``--top-k``, ``--seq-len``, ``--max-tokens``, ``--num-docs`` ..."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def window_length(text: str) -> int:
    """``--seq-len`` where the next-token loss is computed (eval, scale-router): a window of one token
    predicts nothing, and its loss (0 / 0) would read as a model that overflowed."""
    value = _integer(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (the loss predicts each token from the ones "
                                         f"before it), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be zero (``--tokens-trained``)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {value}")
    return value


def fraction(text: str) -> float:
    """A share of a set to take: more than nothing, at most all of it."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: 0 means greedy decoding; negative or non-finite values mean nothing."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {value:g}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (e.g. the audit's sampling temperature, where 0 would mean greedy twice)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def non_positive_float(text: str) -> float:
    """A finite number <= 0: ``--router-bias-init`` (the bias acts as ``min(b, 0)``, so a positive start
    would be a bias that does nothing until training pushes it below 0)."""
    value = _number(text)
    if value > 0:
        raise argparse.ArgumentTypeError(f"must be <= 0, got {value:g}")
    return value


def router_scale(text: str) -> float:
    """A router logit scale (``calibrate-router --scale``): > 0 and at most :data:`MAX_ROUTER_SCALE`."""
    value = _number(text)
    if not 0 < value <= MAX_ROUTER_SCALE:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= {MAX_ROUTER_SCALE:g}, got {value:g}")
    return value


def scale_grid(text: str) -> tuple[float, ...]:
    """Comma-separated logit scales (``1,2,3,4,6,9``): finite, in [0, :data:`MAX_ROUTER_SCALE`], at least one."""
    values = []
    for part in text.split(","):
        value = _number(part.strip())
        if value < 0:
            raise argparse.ArgumentTypeError(f"scales must be >= 0, got {value:g}")
        if value > MAX_ROUTER_SCALE:
            raise argparse.ArgumentTypeError(f"scales must be <= {MAX_ROUTER_SCALE:g}, got {value:g}")
        values.append(value)
    return tuple(values)


def tolerance(text: str) -> float:
    """A bound on |Δ|: NaN would make every comparison fail (or pass), inf would accept anything."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def safe_name(text: str) -> str:
    """An expert or owner name: it becomes part of file names, manifests and HF configs, so one
    path component of plain characters (no '/', no '..', no leading '.' or '-', at most 64)."""
    if not SAFE_NAME.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid name: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit, without '..'")
    return text


def size(text: str) -> int:
    """A byte count with an optional unit: ``5GB``, ``500MB``, ``1.5GB``, ``1048576``."""
    upper = text.strip().upper()
    number, factor = upper, 1
    for unit, unit_factor in _SIZE_UNITS.items():
        if upper.endswith(unit):
            number, factor = upper[: -len(unit)].strip(), unit_factor
            break
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * factor < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1048576 (bytes), got {text!r}")
    return int(value * factor)
