"""Entry point the launchers start on every rank: ``python launchers/train_recipe.py RECIPE KEY=VALUE...``.

Runs :func:`recipes.train.run` (any recipe of ``recipes.train``, the production ones included) under
torchrun; exit code 0 on success.  Kept separate from ``flexolmo train`` so that the launchers do not
depend on the CLI's recipe list.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        print("usage: train_recipe.py RECIPE [recipe.ARG=VALUE | KEY=VALUE ...]", file=sys.stderr)
        return 2
    from recipes.train import run

    run(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
