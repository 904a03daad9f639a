import os

import pytest
import torch

torch.set_num_threads(1)  # 2 cores: thread contention makes the default much slower


@pytest.fixture(autouse=True)
def _clean_fleettune_env(monkeypatch):
    """Tests build their own Settings; a FLEETTUNE_* variable from the shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("FLEETTUNE_"):
            monkeypatch.delenv(name)
