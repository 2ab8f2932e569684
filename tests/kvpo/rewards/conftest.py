"""Reward-model tests run on one intra-op thread like the model tests (tiny models; on the
shared 2-core development machine a second busy thread makes every small op wait)."""

import pytest
import torch

from kvpo.rewards.raft import RAFT
from tests.kvpo.models.conftest import _one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory):
    """Random small-RAFT weights saved as torchvision's .pth state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.pth"
    torch.save(RAFT("small").state_dict(), path)
    return path
