"""pytest hooks for the iotests: group markers, and transcripts for new cases."""

from __future__ import annotations

import pytest

from iotests.cases import GROUPS, TRANSCRIPT_HEADER, Case, all_cases, case_of_transcript


def pytest_configure(config: pytest.Config) -> None:
    """Register every case group as a marker, so `pytest -m quick` selects by group."""
    for group, meaning in GROUPS.items():
        config.addinivalue_line("markers", f"{group}: {meaning}")
    if config.getoption("--update-goldens", default=False):
        _add_missing_transcripts()


def _add_missing_transcripts() -> None:
    """Give each new case an empty transcript, so that --update-goldens collects and fills it."""
    for case in all_cases():
        if not case.transcript.exists():
            case.transcript.write_text(
                TRANSCRIPT_HEADER.format(name=case.name) + "output: ''\n", encoding="utf-8"
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each case's test with the groups of its `# group:` line; run cases in number order."""
    cases: dict[int, Case] = {}
    for index, item in enumerate(items):
        callspec = getattr(item, "callspec", None)
        if callspec is None or "golden" not in callspec.params:
            continue
        transcript, _func = callspec.params["golden"]
        case = case_of_transcript(transcript)
        cases[index] = case
        for group in case.groups():
            item.add_marker(group)
    in_order = sorted(cases, key=lambda index: cases[index].name)
    moved = [items[index] for index in in_order]
    for index, item in zip(sorted(cases), moved, strict=True):
        items[index] = item
