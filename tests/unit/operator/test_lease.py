"""Leader election's rule: who may take the operator's Lease (the API writes are tested in tests/cluster)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kubeflash_operator.lease import LeaseView, may_take

from operator_factories import NOW


@pytest.mark.parametrize("lease, expected", [
    (None, True),
    (LeaseView("", None, 15), True),
    (LeaseView("me", NOW - timedelta(seconds=1), 15), True),
    (LeaseView("other", NOW - timedelta(seconds=5), 15), False),
    (LeaseView("other", NOW - timedelta(seconds=15), 15), False),
    (LeaseView("other", NOW - timedelta(seconds=16), 15), True),
    (LeaseView("other", None, 15), True),
], ids=["no-lease", "handed-back", "ours", "held", "held-at-the-edge", "expired", "never-renewed"])
def test_may_take(lease, expected):
    """A Lease another replica renewed within its duration is theirs; anything else may be taken."""
    assert may_take(lease, "me", NOW) is expected
