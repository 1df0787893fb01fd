"""Experiment trackers (`report_to`): the rows of metrics.jsonl, sent from rank 0."""

from __future__ import annotations


class _Nothing:
    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(cfg, out, step: int, main: bool):
    """The tracker `cfg.report_to` names for the run in `out`, continuing at `step`."""
    return _Nothing()
