"""A pytest plugin that fails any test during which diagnostics report a warning or worse.

Healthy toy training runs must raise no warning. tests/conftest.py enables it for the whole
suite; to use it elsewhere:

    python -m pytest -p tests.diagnostics.strict_plugin tests/methods/sft/test_sft_trainer.py

Tests that provoke problems on purpose opt out with ``@pytest.mark.diagnostics_expected``;
the diagnostics' own test files (named ``*diag*``) are exempt.
"""

from __future__ import annotations

import pytest

from honelm.diagnostics.callback import DiagnosticsCallback

_SERIOUS = ("warning", "error", "critical")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "diagnostics_expected: the test provokes diagnostics on purpose")


@pytest.fixture(autouse=True)
def _no_serious_diagnostics(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    seen = []
    original = DiagnosticsCallback._emit

    def record(self, events, *args, **kwargs):
        seen.extend(e for e in events if e.severity in _SERIOUS and e.status != "resolved")
        return original(self, events, *args, **kwargs)

    monkeypatch.setattr(DiagnosticsCallback, "_emit", record)
    yield
    exempt = "diag" in request.node.path.name or request.node.get_closest_marker("diagnostics_expected")
    if seen and not exempt:
        listing = "\n".join(e.format() for e in seen)
        pytest.fail(f"diagnostics reported problems during a healthy run:\n{listing}", pytrace=False)
