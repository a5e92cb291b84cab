"""The count of the docs' examples, at the end of a run that collected them."""

from __future__ import annotations

from collections import Counter

from _pytest.terminal import TerminalReporter


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    from tests.docs.test_examples import EXAMPLES

    ran = Counter(
        report.outcome
        for key in ("passed", "failed", "skipped")
        for report in terminalreporter.stats.get(key, [])
        if getattr(report, "when", "call") in ("call", "setup")
        and "test_example_runs_as_written" in report.nodeid
    )
    if not ran:
        return
    not_run = [b for b in EXAMPLES if b.not_run is not None]
    terminalreporter.write_line(
        f"docs examples: {len(EXAMPLES) - len(not_run)} to run ({ran['passed']} passed, "
        f"{ran['failed']} failed), {len(not_run)} marked not-run:"
    )
    for block in not_run:
        terminalreporter.write_line(f"  {block.where}: {block.not_run}")
