"""Fixtures of the data-path tests: one compiled data plane per test module, emptied
before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.datapath import SHORT, Harness


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def lb(harness: Harness) -> Harness:
    harness.reset()
    return harness


@pytest.fixture(scope="module")
def short_harness() -> Iterator[Harness]:
    h = Harness(timeouts=SHORT)
    yield h
    h.close()


@pytest.fixture
def short(short_harness: Harness) -> Harness:
    """A data plane with timeouts of seconds (SHORT): its entries expire in a test."""
    short_harness.reset()
    return short_harness
