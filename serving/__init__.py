"""Serving: configuration, the command line, and (later) the Ray Serve application."""
