"""Packaged default configuration files (installed as ``tensorcast_ray.default_config``)."""
