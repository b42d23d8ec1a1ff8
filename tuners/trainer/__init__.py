"""The trainer: ``server-train``."""
