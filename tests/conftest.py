import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from flexolmo_plugin import compat

torch.set_num_threads(1)
# The test suite is an entry point: on a CPU-only machine it runs megatron-core through the
# compatibility shims (spawned workers apply them in tests/support.py).
compat.enable_cpu_compat()


@pytest.fixture(scope="session")
def megatron_single_process():
    """A world of one with TP=EP=1, shared by the single-process tests."""
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    ensure_model_parallel()
    yield
