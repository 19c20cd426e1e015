"""Conformance suites that implementations subclass in their tests.  [SDK, daemon]

:class:`~tensorcast_ray.testing.transport.TransportConformance` holds the tests every
transport passes.  This package needs pytest (the ``test`` extra); ``tensorcast_ray`` never
imports it.
"""

from __future__ import annotations

from tensorcast_ray.testing.transport import TransportConformance

__all__ = ["TransportConformance"]
