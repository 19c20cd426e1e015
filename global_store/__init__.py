"""The Global Store: one named Ray actor per cluster holding metadata only.  [Global Store]

Import it as ``tensorcast_ray.global_store``; the folder is mapped there by setuptools
``package-dir``.
"""

if __name__ != "tensorcast_ray.global_store":  # pragma: no cover - guard
    raise ImportError(
        f"the global_store package was imported as {__name__!r}; "
        "import it as 'tensorcast_ray.global_store'"
    )
