"""Shared pytest setup: the real-service fixtures (mosquitto, SeaweedFS) are a plugin."""

pytest_plugins = ["conftest_services"]
