"""Running the server: the configuration checked (validation), listeners,
signals and privileges (server), the supervisor and its workers (workers;
``workers.run`` is the entry point), systemd, metrics export, log formats.

The top layer: it may import every layer below.
"""
