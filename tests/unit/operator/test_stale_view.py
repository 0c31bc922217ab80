"""Which job views a step skips (handlers._before): views older than our last status write, and, after a status
patch answered 409 (the job changed since the view it was decided on, recorded with no version written), that same
view until the watch brings a newer one or STALE_S passes; a newer view is acted on at once."""

from __future__ import annotations

import time

from kubeflash_operator import handlers


def test_views_before_our_write_are_skipped_however_late():
    sent = ("100", "120", time.monotonic() - 10 * handlers.STALE_S)
    assert handlers._before("110", sent) and handlers._before("100", sent)
    assert not handlers._before("120", sent) and not handlers._before("121", sent)


def test_after_a_conflict_the_same_view_waits_and_a_newer_one_goes_on():
    conflicted = ("55989", "", time.monotonic())  # what reconcile_job records on a job status 409
    assert handlers._before("55989", conflicted)
    assert not handlers._before("56000", conflicted)  # the watch's newer view: decided again at once
    expired = ("55989", "", time.monotonic() - handlers.STALE_S - 1)
    assert not handlers._before("55989", expired)  # no newer view for STALE_S: one more try on it
