"""Shared test data: objects the API and dynvol's core must accept or reject alike."""
