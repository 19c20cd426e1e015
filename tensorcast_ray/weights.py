"""Weight sync: ``tc.weights.Publisher`` / ``tc.weights.Subscriber``.  [SDK]

Re-exports :mod:`tensorcast_ray._weights`; see docs/weights.md.
"""

from tensorcast_ray._weights import Publisher, Subscriber, UpdateHandle, reading

__all__ = ["Publisher", "Subscriber", "UpdateHandle", "reading"]
