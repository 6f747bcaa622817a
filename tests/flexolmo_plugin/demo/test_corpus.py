"""The demo's text comes from installed third-party packages only: this project's own installed metadata
holds the README (which quotes the demo's results), and with it every README edit changed the next
demo's numbers (measured 2026-12-02: a CI run failed on a README-only commit)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from flexolmo_plugin.demo import corpus

README = Path(__file__).resolve().parents[3] / "README.md"


def test_this_projects_metadata_is_installed_and_holds_the_readme():
    # the premise of the exclusion: scripts/setup_venv.sh installs the project, README as long_description
    metadata = importlib.metadata.distribution("flexolmo-megatron").read_text("METADATA")
    line = next(x for x in README.read_text().splitlines() if len(x) > 60)
    assert line in metadata


def test_no_demo_text_comes_from_this_project():
    lines = [x for x in README.read_text().splitlines() if len(x) > 60][:20]
    for source in (corpus._metadata_sources, corpus._license_sources):
        documents = list(source())
        assert documents  # the machine has other packages' text
        for path, text in documents:
            assert "flexolmo_megatron" not in Path(path).parent.name.lower()
            assert not any(line in text for line in lines), path
