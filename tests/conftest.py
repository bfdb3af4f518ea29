"""Shared fixtures: real Mosquitto brokers, the packaged real models."""

pytest_plugins = ["tests.conftest_brokers", "tests.fixtures_models"]
