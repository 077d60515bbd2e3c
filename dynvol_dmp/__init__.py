"""The Dynamic Mount Pod agent (``dynvol dmp``): mounts the DynamicVolumeMounts assigned to
it through provider plugins, supervises their FUSE daemons and reports status."""

from dynvol_dmp.agent import Agent, Settings, run

__all__ = ["Agent", "Settings", "run"]
