"""Connecting to Ray: one helper for drivers (CLI commands, the demo, jobs).

With RAY_ADDRESS set (the embedded stack's `env`, or a job submitted to a cluster) it
joins that cluster; otherwise it starts a private one-node Ray bound to 127.0.0.1.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = ("127.0.0.1", "localhost")


def pin_ray_to_loopback() -> None:
    """Make Ray advertise 127.0.0.1 rather than the machine's address (single-node use).

    Ray reads this switch (named for the platforms where it is the default) when
    `ray._private.ray_constants` is imported, so an already imported module is updated too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, **kwargs):
    """`ray.init` that stays on the loopback interface for local clusters."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    # A local multi-node cluster (LocalStack(multinode=True)) advertises the machine's address instead.
    multinode = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "1"
    if (address or "127.0.0.1").rsplit(":", 1)[0] in LOOPBACK and not multinode:
        pin_ray_to_loopback()
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
    import ray

    if ray.is_initialized():
        return ray
    if address is None:
        kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, **kwargs)
    return ray


def quiet_ray_data() -> None:
    """Keep Ray Data's per-dataset progress logs out of the console (they stay in Ray's log files)."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
