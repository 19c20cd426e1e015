"""The node daemon: one detached Ray actor per node owning the node's bytes.  [daemon]

Import it as ``tensorcast_ray.daemon``; the folder is mapped there by setuptools
``package-dir``. A bare ``import daemon`` would collide with the PyPI package of that name.
"""

if __name__ != "tensorcast_ray.daemon":  # pragma: no cover - guard
    raise ImportError(
        f"the daemon package was imported as {__name__!r}; import it as 'tensorcast_ray.daemon'"
    )
