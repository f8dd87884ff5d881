"""Fixtures for the service tests: one real service shared by the API tests."""

import pytest
from service_testlib import Service, start_service


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    """One service shared by the API tests: a queue big enough for the concurrency test, 16 MiB uploads
    (room for a decompression bomb), 2048x2048 pixels at most."""
    svc = start_service(tmp_path_factory.mktemp("service"), "--queue-size", "64", "--max-upload-mb", "16",
                        "--keep-jobs", "64", "--max-pixels", str(2048 * 2048))
    yield svc
    svc.stop()


@pytest.fixture
def client(service):
    with service.client() as http:
        yield http
