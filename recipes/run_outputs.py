"""What a training run adds to its save directory, and taking it back when the run fails before its
first checkpoint (Bridge rewrites ``TRACKER_FILE`` once a checkpoint is complete): a refused or crashed
run must leave the save directory as it found it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from flexolmo_plugin.conversion.atomic import temporary_name
from flexolmo_plugin.conversion.mcore_io import CONFIG_FILE, TRACKER_FILE


class RunOutputs:
    """What a run adds to its save directory, taken back if it stops before it completed a checkpoint.

    Recorded before anything is written: the top-most directory the run will create (the save directory
    or a missing parent of it), or -- for a save directory that already exists (a resumed run, or one the
    user made) -- every path in it and the bytes of its ``flexolmo_config.json`` and checkpoint tracker.
    :meth:`undo` removes exactly the paths that were not there and restores that file, unless the tracker
    shows that this run completed a checkpoint (then everything stays: the run can be resumed from it).
    """

    def __init__(self, save_dir: str | os.PathLike):
        self.path = Path(save_dir)
        self.created: Path | None = None
        existing = self.path.absolute()
        while not existing.exists():
            self.created, existing = existing, existing.parent
        self.before: set[str] = set()
        self.saved: dict[str, bytes | None] = {CONFIG_FILE: None, TRACKER_FILE: None}
        if self.created is None:
            for root, directories, files in os.walk(self.path):
                relative = Path(root).relative_to(self.path)
                self.before.update(str(relative / name) for name in directories + files)
            for name in self.saved:
                if (self.path / name).is_file():
                    self.saved[name] = (self.path / name).read_bytes()

    def checkpointed(self) -> bool:
        tracker = self.path / TRACKER_FILE
        return tracker.is_file() and tracker.read_bytes() != self.saved[TRACKER_FILE]

    def undo(self) -> None:
        """Remove what the run added (nothing, once it completed a checkpoint); never raises over the
        error that stopped the run."""
        try:
            if self.checkpointed():
                return
            if self.created is not None:
                shutil.rmtree(self.created, ignore_errors=True)
                return
            for root, directories, files in os.walk(self.path, topdown=True):
                relative = Path(root).relative_to(self.path)
                for name in list(directories):
                    if str(relative / name) not in self.before:
                        shutil.rmtree(Path(root) / name, ignore_errors=True)
                        directories.remove(name)
                for name in files:
                    if str(relative / name) not in self.before:
                        (Path(root) / name).unlink(missing_ok=True)
            old = self.saved[CONFIG_FILE]
            config = self.path / CONFIG_FILE
            if old is not None and (not config.is_file() or config.read_bytes() != old):
                temporary = temporary_name(config)
                temporary.write_bytes(old)
                os.replace(temporary, config)
        except OSError as error:
            print(f"[flexolmo] could not remove what the failed run wrote to {self.path}: {error}", file=sys.stderr)
