"""Run the doctests of the aggregator modules (the suite does not use --doctest-modules)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["aggregator.case", "aggregator.metrics", "aggregator.schema", "aggregator.keyimages",
                                  "aggregator.fhir", "aggregator.sr", "aggregator.report",
                                  "aggregator.hl7v2"])
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "aggregator.schema":
        assert result.attempted > 0
