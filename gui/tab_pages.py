"""The settings tabs' pages, each built when it is first shown or asked for.

The window paints before its hidden tabs exist: a tab's page (its SettingsForm in a scroll area, and
beside it the side panel that follows it: the dataset doctor, the VRAM estimate, the samples) is an
empty holder until the tab is shown, something asks for its form or panel, or the window has been
painted once (then the rest are built one per turn of the event loop, so a click on a tab finds it
ready). What the window needs of a tab before that (which settings it holds: its visibility and its
warning icon) comes from gui.tab_layout without any widget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from PySide6.QtCore import QByteArray, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import QFrame, QScrollArea, QSplitter, QTabWidget, QVBoxLayout, QWidget

from .config_state import ConfigState
from .settings_form import SettingsForm
from .side_panel import SidePanel
from .tab_layout import TABS, tab_keys

log = logging.getLogger(__name__)

SIDE_PANEL_SHARE = 0.42  # of a tab's width, for the panel beside the settings at first start


class LazyForms(Mapping[str, SettingsForm]):
    """window.forms: the form of a tab by name, built when asked for."""

    def __init__(self, pages: TabPages) -> None:
        self._pages = pages

    def __getitem__(self, name: str) -> SettingsForm:
        return self._pages.form(name)

    def __iter__(self) -> Iterator[str]:
        return iter(spec.name for spec in TABS)

    def __len__(self) -> int:
        return len(TABS)


class TabPages(QObject):
    built_page = Signal(str, QWidget)  # (tab name, its whole page) once a page is built

    def __init__(
        self,
        tabs: QTabWidget,
        state: ConfigState,
        side_panel: Callable[[str], SidePanel | None],
        splitter_state: Callable[[str], QByteArray | None],
        width: int,
        below: Callable[[str], QWidget | None] | None = None,
    ) -> None:
        """side_panel(name): the panel beside that tab's settings (or None), made when the page is built;
        splitter_state(key): a divider's remembered state; width: the window's default width;
        below(name): a widget under the settings and the panel (the Data tab's dataset editor), or None."""
        super().__init__(tabs)
        self.tabs, self.state = tabs, state
        self._side_panel, self._splitter_state, self._width = side_panel, splitter_state, width
        self._below = below or (lambda name: None)
        self.below_widgets: dict[str, QWidget] = {}
        self.keys: dict[str, tuple[str, ...]] = {spec.name: tuple(tab_keys(spec)) for spec in TABS}
        self.built: dict[str, SettingsForm] = {}
        self.side_panels: dict[str, SidePanel] = {}
        self.side_splitters: dict[str, QSplitter] = {}
        self._holders: dict[str, QVBoxLayout] = {}
        for spec in TABS:
            holder = QWidget()
            column = QVBoxLayout(holder)
            column.setContentsMargins(0, 0, 0, 0)
            self._holders[spec.name] = column
            tabs.addTab(holder, spec.title)
        tabs.currentChanged.connect(self._current_changed)

    def form(self, name: str) -> SettingsForm:
        """That tab's form, built now if it is not yet."""
        if name not in self.built:
            self._build(name)
        return self.built[name]

    def panel(self, name: str) -> SidePanel:
        """The side panel beside that tab's settings, built (with its page) now if it is not yet."""
        self.form(name)
        return self.side_panels[name]

    def build_current(self) -> None:
        self.form(TABS[max(0, self.tabs.currentIndex())].name)

    def build_rest_later(self) -> None:
        """Build the pages not built yet, one per turn of the event loop (after the first paint)."""
        rest = [spec.name for spec in TABS if spec.name not in self.built]
        if rest:
            self.form(rest[0])
            QTimer.singleShot(0, self.tabs, self.build_rest_later)  # not after the tabs are gone

    def _current_changed(self, index: int) -> None:
        if index >= 0:
            self.form(TABS[index].name)

    def _build(self, name: str) -> None:
        spec = next(s for s in TABS if s.name == name)
        form = SettingsForm(spec.entries, self.state)
        self.built[name] = form
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(form)
        page: QWidget = scroll
        panel = self._side_panel(name)
        if panel is not None:
            self.side_panels[name] = panel
            splitter = QSplitter(Qt.Orientation.Horizontal)
            splitter.setChildrenCollapsible(False)
            splitter.addWidget(scroll)
            splitter.addWidget(panel)
            splitter.setStretchFactor(0, 3)
            splitter.setStretchFactor(1, 2)
            splitter.setSizes([round(self._width * (1 - SIDE_PANEL_SHARE)), round(self._width * SIDE_PANEL_SHARE)])
            remembered = self._splitter_state(f"side_{name}")
            if remembered is not None:
                splitter.restoreState(remembered)
            self.side_splitters[name] = splitter
            page = splitter
        bottom = self._below(name)
        if bottom is not None:
            self.below_widgets[name] = bottom
            column = QSplitter(Qt.Orientation.Vertical)
            column.setChildrenCollapsible(False)
            column.addWidget(page)
            column.addWidget(bottom)
            column.setStretchFactor(0, 2)
            column.setStretchFactor(1, 3)
            remembered = self._splitter_state(f"side_below_{name}")  # saved as every side_splitters entry is
            if remembered is not None:
                column.restoreState(remembered)
            self.side_splitters[f"below_{name}"] = column
            page = column
        self._holders[name].addWidget(page)
        page.show()  # now, not at the layout's queued show: a panel shown refreshes at once
        form.update_state()  # the fields show the config already; what applies and what is wrong
        self.built_page.emit(name, self._holders[name].parentWidget())
        log.debug("tab %s built", name)
