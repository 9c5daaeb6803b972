"""Stemflow notifier: batched WebSocket push of job events."""
