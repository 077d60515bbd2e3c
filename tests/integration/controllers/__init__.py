"""Integration tests of dynvol_controllers against a real apiserver."""
