"""Notices that a node is about to go, turned into Ray's drain of that node.

    python -m cluster.preemption spot     # on an AWS spot node: watch for its interruption notice
    ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "pod terminating" \\
        --deadline-remaining-seconds 110  # a Kubernetes pod's preStop hook (cluster/kuberay/)

Ray Train watches for drained nodes; the training loop checkpoints at the next step
boundary when a node of its run is drained and stops, and Ray Train resumes the run on the
nodes left and their replacements (`jobs/training/loop.py`, `Worker.on_notice`). So a
notice costs at most the step in flight, instead of every step since the last periodic
checkpoint.

- AWS spot: two minutes before a reclaim, the instance metadata service answers
  `spot/instance-action` with the action and its time. `spot` polls it (IMDSv2) every
  5 s and drains this node with the time left as the deadline.
- Kubernetes: a pod being deleted (a spot node's drain, a scale-down, an eviction) gets
  SIGTERM and `terminationGracePeriodSeconds`; its preStop hook drains the node first and
  waits, so the checkpoint lands before Ray stops (cluster/kuberay/raycluster.yaml).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

IMDS = "http://169.254.169.254"


def drain_this_node(message: str, deadline_s: int | None) -> None:
    """Ray's drain of the node this runs on (the preemption reason)."""
    cmd = ["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message]
    if deadline_s is not None:
        cmd += ["--deadline-remaining-seconds", str(max(1, int(deadline_s)))]
    subprocess.run(cmd, check=True)


def spot_notice(imds: str = IMDS, timeout: float = 2.0) -> dict | None:
    """The spot interruption notice ({"action": "terminate", "time": "...Z"}), or None."""
    token_request = urllib.request.Request(
        f"{imds}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    try:
        with urllib.request.urlopen(token_request, timeout=timeout) as r:
            token = r.read().decode()
        request = urllib.request.Request(
            f"{imds}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
        )
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # no interruption scheduled
            return None
        raise


def watch_spot(imds: str = IMDS, every: float = 5.0) -> None:
    while True:
        try:
            notice = spot_notice(imds)
        except (OSError, ValueError) as e:  # the metadata service busy: ask again
            print(f"[preemption] spot notice unavailable: {e}", file=sys.stderr, flush=True)
            notice = None
        if notice:
            when = datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            left = (when - datetime.now(UTC)).total_seconds()
            print(f"[preemption] spot {notice['action']} at {notice['time']}: draining this node", flush=True)
            drain_this_node(f"spot {notice['action']} at {notice['time']}", left)
            return
        time.sleep(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["spot"], help="spot: the AWS spot interruption notice")
    p.add_argument("--every", type=float, default=5.0, help="seconds between polls (default 5)")
    args = p.parse_args()
    watch_spot(every=args.every)


if __name__ == "__main__":
    main()
