"""The event schema, the code table and its documentation."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from honelm.diagnostics import CODES, SCHEMA_VERSION, SEVERITIES, DiagnosticEvent, Suggestion
from honelm.diagnostics.codes import AREAS, parse_silence, parse_stop_on

DOCS = Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md"


def _event(**overrides):
    fields = dict(code="LOSS_DIVERGING", severity="critical", status="ongoing", step=12, first_step=4,
                  message="The loss is diverging.", evidence={"recent": [1.0, math.nan, math.inf], "ratio": 2.0},
                  suggestions=(Suggestion("learning_rate", 1.0, 0.1, "smaller updates"),),
                  docs="docs/diagnostics.md#loss_diverging", area="training", count=3)
    fields.update(overrides)
    return DiagnosticEvent(**fields)


def test_event_json_is_strict_and_round_trips():
    event = _event()
    line = event.to_json()
    data = json.loads(line)  # strict JSON: NaN/inf became strings
    assert data["evidence"]["recent"] == [1.0, "nan", "inf"]
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "code", "severity", "status", "step", "first_step", "count", "subject",
                         "area", "message", "evidence", "suggestions", "docs"}
    assert data["suggestions"] == [{"param": "learning_rate", "current": 1.0, "proposed": 0.1,
                                    "reason": "smaller updates"}]
    back = DiagnosticEvent.from_dict(data)
    assert back.to_dict() == data and back.suggestions[0] == event.suggestions[0]


def test_newer_schema_is_refused_with_a_clear_message():
    data = {**_event().to_dict(), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="Upgrade honelm"):
        DiagnosticEvent.from_dict(data)


def test_console_format_is_readable():
    text = _event(status="new", step=4, count=1).format()
    assert text.splitlines()[0] == "honelm diagnostics [CRITICAL] LOSS_DIVERGING at step 4: The loss is diverging."
    assert text.splitlines()[1] == "    evidence: recent=[1, nan, inf], ratio=2"
    assert "try: learning_rate: 1.0 -> 0.1 (smaller updates)" in text and "docs: docs/diagnostics.md#" in text
    repeat = _event().format()
    assert repeat.splitlines()[0] == ("honelm diagnostics [CRITICAL] LOSS_DIVERGING still present at step 12 "
                                      "(since step 4, seen 3 times): The loss is diverging.")
    assert len(repeat.splitlines()) == 2  # the evidence; suggestions were shown the first time
    resolved = _event(status="resolved", message="No longer detected.").format()
    assert resolved.startswith("honelm diagnostics [resolved] LOSS_DIVERGING at step 12") and "\n" not in resolved


def test_code_table_is_consistent():
    assert len(CODES) >= 35
    for code, info in CODES.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", code) and info.code == code
        assert info.area in AREAS and info.severity in SEVERITIES
        assert info.meaning.endswith(".") and info.docs == f"docs/diagnostics.md#{code.lower()}"
        assert all(isinstance(v, float) for v in info.thresholds.values())


def _sections():
    text = DOCS.read_text()
    parts = re.split(r"^#### ([A-Z0-9_]+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_docs_explain_every_code_with_its_defaults():
    sections = _sections()
    assert set(sections) == set(CODES)
    for code, body in sections.items():
        info = CODES[code]
        for part in ("**What it means.**", "**Why it happens.**", "**What to do.**"):
            assert part in body, (code, part)
        assert body.lstrip().startswith(f"*{info.severity}"), code
        for name, value in info.thresholds.items():
            assert f"`{name}={value:g}`" in body, (code, name)
        if not info.thresholds:
            assert "thresholds: none" in body, code


def test_silence_and_stop_on_parsing():
    assert parse_silence("loss_flat, GRAD_NORM_SPIKE") == ("LOSS_FLAT", "GRAD_NORM_SPIKE")
    assert parse_stop_on("None") is None and parse_stop_on("CRITICAL") == "critical"
    with pytest.raises(ValueError, match="Choose 'error'"):
        parse_stop_on("warning")


def test_importing_diagnostics_is_light():
    code = ("import sys, honelm.diagnostics, honelm.diagnostics.codes, honelm.diagnostics.events; "
            "import honelm.diagnostics.engine; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
