"""The coordinator's terminal report: the sites' words are printed as text, never as markup."""

from __future__ import annotations

import io

from rich.console import Console

from coordinator.report import Reporter


def _reporter() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(Console(file=out, width=60, soft_wrap=True, color_system=None)), out


def test_warnings_and_messages_keep_brackets_and_are_not_wrapped() -> None:
    reporter, out = _reporter()
    path = "/srv/hospital/exports/very/long/folder/name/that/would/wrap [/anon]/scan.dcm"
    reporter.warning(f"site-1: round failed: {path} unreadable [bold]")
    reporter.info(f"site-2: [red]{path}")
    text = out.getvalue()
    assert f"warning: site-1: round failed: {path} unreadable [bold]\n" in text
    assert f"site-2: [red]{path}\n" in text


def test_a_round_summary_names_sites_as_they_are() -> None:
    reporter, out = _reporter()
    record = {
        "label": "round 1",
        "weighted_dice": 0.5,
        "evaluation": {"[site]": {}},
        "participants": ["[site]"],
        "left_out": [{"site": "[/site]"}],
        "duration_s": 1.0,
        "bytes_sent": 10,
        "bytes_received": 20,
    }
    reporter.round_done(record)
    assert "trained at [site]; left out: [/site]" in out.getvalue()
