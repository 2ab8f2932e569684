"""Reward-model tests run on one intra-op thread like the model tests (tiny models; on the
shared 2-core development machine a second busy thread makes every small op wait)."""

from tests.kvpo.models.conftest import _one_thread  # noqa: F401  (autouse fixture)
