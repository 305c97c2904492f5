"""The gunicorn worker class: gunicorn's own gevent worker, extended (its bounded reads and error answers are
tested end to end in tests/integration)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.support import load_gunicorn_conf


@pytest.fixture(scope="module")
def conf() -> ModuleType:
    return load_gunicorn_conf("gunicorn_conf_under_test")


def test_the_worker_class_is_gunicorns_gevent_worker(conf: ModuleType) -> None:
    from gunicorn.workers.ggevent import GeventWorker

    assert issubclass(conf.worker_class, GeventWorker)
