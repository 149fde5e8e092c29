"""The soak run's short variant (`unilip bench soak`, jobs/performance/soak.py): three faults
of the kinds the other tests do not combine, on a 3-node local cluster of its own, with
keys rotating every 30 s; every sample of every epoch trained exactly once."""

import pytest

from jobs.performance.soak import run_soak

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]


def test_soak_short_variant_survives_a_worker_kill_an_s3_outage_and_a_notice():
    result = run_soak(seed=0, steps=48, schedule=["worker", "outage", "notice"], gaps=(5.0, 10.0))
    assert result["faults_injected"] == {"worker": 1, "node": 0, "notice": 1, "outage": 1}
    assert result["steps_recorded_once"] and result["samples_lost"] == result["samples_repeated"] == 0
    assert result["steps_redone"]["notice"] == [0]  # a notice costs at most the step in flight
    assert result["registered"].startswith("models:/unilip-tiny-recon-stage1/")
