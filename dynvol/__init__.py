"""dynvol."""
