"""An example third-party dynvol provider: ``tmpfs`` (see :mod:`.plugin`)."""
