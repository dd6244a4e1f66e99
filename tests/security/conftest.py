"""The security suite runs on the service tests' real processes and fixtures."""

from tests.services.conftest import http, medium_hf, moto_url, tiny_hf  # noqa: F401 - fixtures
