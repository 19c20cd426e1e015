"""tensorcast_ray: a shared, tiered tensor store for Ray clusters."""

from tensorcast_ray._version import __version__

__all__ = ["__version__"]
