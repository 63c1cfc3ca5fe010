"""The start check: what Start would refuse, found while the settings are edited.

core.train.preflight.start_problems (the run's own refusals, the rules across settings, the paths
that must be set, and whether the dataset folders hold anything to train on) runs on a
BackgroundJob a moment after the edits pause, whatever tab is shown, and its findings go into the
ConfigState: the fields they name turn red with the message, and Start is disabled with the first
one as its reason. The checks that need torch or the model family's classes join once the engine's
background import has ended (`engine_loaded`). The dataset doctor's report, when it is for the
current dataset settings and finds nothing to train (or strict_data refusing), counts too.

The preflight module is imported by the job's thread at its first run, never before the window has
been painted.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject

from .background import BackgroundJob, JobControl
from .config_state import ConfigState, Problem
from .doctor_plan import probe_inputs
from .labels import labelled

if TYPE_CHECKING:
    from core.data.doctor import DatasetReport

log = logging.getLogger(__name__)

DEBOUNCE_MS = 400


def engine_is_loaded() -> bool:
    """Whether torch and the engine are imported (EngineWarmUp or a run did it)."""
    return "core.train.trainer" in sys.modules and "torch" in sys.modules


def _check(config: dict[str, Any], _control: JobControl) -> list[Problem]:
    from core.train.preflight import start_problems

    cuda = None
    if engine_is_loaded():
        import torch

        cuda = torch.cuda.is_available()
    return [Problem(key, labelled(str(e))) for e in start_problems(config, cuda=cuda) for key in (e.keys or ("",))]


class StartCheck(QObject):
    def __init__(self, state: ConfigState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.found: list[Problem] = []  # the last check's findings
        self.error: str | None = None
        self._doctor: tuple[dict[str, Any], str] | None = None  # (probe inputs, 'nothing to train' line)
        self.job = BackgroundJob(_check, DEBOUNCE_MS, "the start check", self)
        self.job.finished_ok.connect(self._checked)
        self.job.failed.connect(self._failed)
        state.edited.connect(lambda _key: self.request())
        state.replaced.connect(self.request)

    def request(self, *, now: bool = False) -> None:
        self._publish()  # the doctor's verdict may no longer hold for the new settings
        self.job.request(copy.deepcopy(self.state.config), now=now)

    def engine_loaded(self) -> None:
        """torch is imported: check again with the checks that need it."""
        self.request(now=True)

    def doctor_reported(self, config: dict[str, Any], report: DatasetReport) -> None:
        """The dataset doctor's report for these settings: a 'nothing to train' verdict blocks Start."""
        line = None
        if not report.usable:
            line = f"Nothing to train on: {report.why_unusable} (dataset doctor, Data tab)"
        elif report.strict_refused:
            line = (f"“Strict data” refuses to train: the dataset doctor found {len(report.fatal_issues)} unusable "
                    "file(s) (Data tab); fix them, or turn Strict data off to skip them")
        self._doctor = (probe_inputs(config), line) if line else None
        self._publish()

    def settle(self, timeout_ms: int = 30_000) -> bool:
        return self.job.wait(timeout_ms)

    def shutdown(self) -> None:
        self.job.shutdown()

    def _checked(self, _config: dict[str, Any], problems: list[Problem]) -> None:
        self.found, self.error = problems, None
        self._publish()

    def _failed(self, _config: dict[str, Any], message: str) -> None:
        # A check that cannot run says nothing about the settings: Start stays as it was, and
        # pressing it gets the run's own answer.
        log.warning("the start check failed: %s", message)
        self.found, self.error = [], message
        self._publish()

    def _publish(self) -> None:
        problems = list(self.found)
        said = any(p.key == "datasets" and p.message.startswith("Nothing to train on") for p in problems)
        if self._doctor is not None and not said and self._doctor[0] == probe_inputs(self.state.config):
            problems.append(Problem("datasets", self._doctor[1]))
        self.state.set_start_problems(problems)
