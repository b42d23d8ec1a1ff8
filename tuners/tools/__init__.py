"""Offline commands on a task artifact, with no server: ``server-predict``, ``server-val``, ``server-export``."""
