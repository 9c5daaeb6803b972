"""Stemflow gateway: the public HTTP API and the owner of job state."""
