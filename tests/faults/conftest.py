"""One lab per session for every fault-injection case (building it takes a few seconds)."""

import pytest

from tests.faults.harness import build_lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory, megatron_single_process):
    return build_lab(tmp_path_factory.mktemp("lab"))
