"""The HTTP server: one frozen backbone, many hot-swapped task tuners (see ARCHITECTURE.md)."""
