"""Fixtures for the service tests: one real service shared by the API tests."""

import pytest
from service_testlib import Service, start_service


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    """One service shared by the API tests: a queue big enough for the concurrency test, 4 MiB uploads."""
    svc = start_service(tmp_path_factory.mktemp("service"), "--queue-size", "64", "--max-upload-mb", "4",
                        "--keep-jobs", "64")
    yield svc
    svc.stop()


@pytest.fixture
def client(service):
    with service.client() as http:
        yield http
