"""The providers dynvol ships, each a plugin registered through its entry point."""
