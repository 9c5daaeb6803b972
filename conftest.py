"""Fixtures for real RabbitMQ, MongoDB and Redis are shared by every test in the repository."""

pytest_plugins = ["stemflow_dev.fixtures"]
