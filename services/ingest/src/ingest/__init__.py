"""Stemflow ingest: fetch, validate, decode and normalise audio."""
