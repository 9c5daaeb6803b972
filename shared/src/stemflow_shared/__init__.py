"""Stemflow's shared library: the event contract, messaging, settings, telemetry, storage."""
