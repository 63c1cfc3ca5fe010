"""The VRAM estimate beside the Model tab's memory settings, following them as they change.

core.memory.estimate.estimate_memory reads the model's config files (or its built-in configs of the
Wan models) and never imports torch, but its first call imports huggingface_hub (a second or two),
so it runs on a BackgroundJob, a moment after the edits pause. The GPU's capacity needs torch: it is
asked for (core.memory.estimate.detect_vram, on a worker thread) only once the engine's background
import has finished (`engine_loaded`), never before the window has shown.
"""

from __future__ import annotations

import copy
import html
from typing import Any

from PySide6.QtWidgets import QGridLayout, QLabel, QProgressBar, QWidget

from core.memory.caching import stage_sized
from core.memory.estimate import Estimate, detect_vram, estimate_memory

from .background import BackgroundJob, JobControl
from .config_state import ConfigState
from .side_panel import SidePanel, muted_label

GIB = 2**30
DEBOUNCE_MS = 300
PARTS = (
    ("weights", "Weights"),
    ("trainable_state", "Trained state"),
    ("activations", "Activations"),
    ("workspace", "Workspace"),
)
FITS_COLOUR, NO_FIT_COLOUR = "#2e7d32", "#c9302c"
OWN_ANSWER = ("datasets", "base_model", "model_type")  # problems the estimate does not refuse for


def _estimate(config: dict[str, Any], _control: JobControl) -> Estimate:
    return estimate_memory(config)


def _detect_gpu(_argument: Any, _control: JobControl) -> tuple[int, str] | None:
    return detect_vram()


def gib(value: int) -> str:
    """GiB with two decimals; below a tenth of one (tiny test models), MiB."""
    if value < GIB / 10:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def model_part_lines(estimate: Estimate) -> list[tuple[str, str]]:
    """(part, what it is) for every part the run loads (details["parts"]): "text_encoder_2",
    "clip_text_model, BFLOAT_16: 0.23 GiB, caching only"."""
    lines = []
    for part in estimate.details.get("parts", []):
        size = gib(part["bytes"]) if part.get("bytes") is not None else "not sized"
        when = "caching only" if part.get("when") == "caching" else "in training"
        lines.append((part["name"], f"{part['kind']}, {part['weight_dtype']}: {size}, {when}"))
    return lines


def caching_text(estimate: Estimate) -> str:
    """The caching phase's figure beside the training step's, and which is the higher."""
    caching = estimate.details.get("caching")
    if not caching:
        return ""
    tiled = " (tiled)" if caching.get("tiled") else ""
    unsized = f"; not counted: {', '.join(caching['unsized'])}" if caching.get("unsized") else ""
    higher = "filling the caches needs more than a training step" if estimate.phase == "caching" else "a training step needs more"
    if not (stage_sized(caching, "vae") or stage_sized(caching, "text")):
        return f"Filling the caches: not sized for this model{unsized}."
    if caching.get("unsized"):
        higher += ", of what is sized"
    vae = gib(caching["vae"]) if stage_sized(caching, "vae") else "not sized"
    text = gib(caching["text"]) if stage_sized(caching, "text") else "not sized"
    return (f"Filling the caches: about {gib(estimate.caching_needed_bytes)} (VAE{tiled} {vae}, "
            f"text encoders {text}{unsized}); {higher}.")


def part_notes(estimate: Estimate) -> dict[str, str]:
    """What each part is made of, in the words of `main.py estimate`."""
    d = estimate.details
    kept = "".join(f", {name} kept loaded ({gib(size)})" for name, size in (d.get("kept_text_encoders") or {}).items())
    return {
        "weights": f"{estimate.weights_note()}{kept}",
        "trainable_state": f"{d.get('trained_parameters', 0) / 1e6:.1f} M parameters, {d.get('optimizer')}",
        "activations": f"gradient checkpointing {d.get('checkpointing')}",
        "workspace": "loss tensors, dequantized layer, optimizer step",
    }


class EstimatePanel(SidePanel):
    def __init__(self, state: ConfigState, parent: QWidget | None = None) -> None:
        super().__init__("VRAM estimate", parent)
        self.state = state
        self.estimate: Estimate | None = None
        self.error: str | None = None
        self.gpu: tuple[int, str] | None = None  # (bytes, name) once known
        self.gpu_checked = False
        self._gpu_error: str | None = None

        self.job = BackgroundJob(_estimate, DEBOUNCE_MS, "the VRAM estimate", self)
        self.job.finished_ok.connect(self._estimated)
        self.job.failed.connect(self._failed)
        self.job.busy.connect(self._busy)
        self.gpu_job = BackgroundJob(_detect_gpu, 0, "finding the GPU", self)
        self.gpu_job.finished_ok.connect(self._gpu_found)
        self.gpu_job.failed.connect(lambda _a, message: self._gpu_found(None, None, message))

        self.peak_label = QLabel()
        self.peak_label.setObjectName("estimatePeak")
        font = self.peak_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.6)
        font.setBold(True)
        self.peak_label.setFont(font)
        self.peak_help = muted_label("peak GPU memory of a training step (what torch.cuda.max_memory_allocated would show)")
        self.needed_label = QLabel()
        self.needed_label.setWordWrap(True)
        self.gpu_label = QLabel()
        self.gpu_label.setWordWrap(True)
        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setTextVisible(False)
        self.busy_bar.setMaximumHeight(self.fontMetrics().height() // 2)
        self.busy_bar.hide()

        self.parts = QGridLayout()
        self.parts.setHorizontalSpacing(10)
        self.parts.setColumnStretch(2, 1)
        self.part_rows: dict[str, tuple[QLabel, QLabel, QProgressBar, QLabel]] = {}
        for row, (key, title) in enumerate(PARTS):
            name, value, bar, note = QLabel(title), QLabel(), QProgressBar(), muted_label()
            bar.setTextVisible(False)
            bar.setMaximumHeight(self.fontMetrics().height() // 2)
            bar.setRange(0, 1000)
            self.parts.addWidget(name, 2 * row, 0)
            self.parts.addWidget(value, 2 * row, 1)
            self.parts.addWidget(bar, 2 * row, 2)
            self.parts.addWidget(note, 2 * row + 1, 0, 1, 3)
            self.part_rows[key] = (name, value, bar, note)
        self.caching_label = QLabel()
        self.caching_label.setWordWrap(True)
        self.caching_label.setObjectName("estimateCaching")
        # The model's parts (transformer, each text encoder, VAE) with their dtypes and bytes.
        self.model_parts = QGridLayout()
        self.model_parts.setHorizontalSpacing(10)
        self.model_part_labels: dict[str, tuple[QLabel, QLabel]] = {}
        self.model_label = muted_label()
        self.error_label = muted_label()
        self.error_label.setObjectName("estimateError")

        for widget in (self.peak_label, self.peak_help, self.busy_bar, self.needed_label, self.gpu_label):
            self.body.addWidget(widget)
        self.body.addSpacing(6)
        self.body.addLayout(self.parts)
        self.body.addWidget(self.caching_label)
        self.body.addLayout(self.model_parts)
        self.body.addWidget(self.model_label)
        self.body.addWidget(self.error_label)
        self.body.addStretch(1)
        self._asked: dict[str, Any] | None = None  # the settings of the last estimate asked for
        self.state.edited.connect(lambda _key: self.settings_changed())
        self.state.replaced.connect(self.settings_changed)
        # The start check's findings arrive after the edit: an estimate may become refused, or allowed.
        self.state.problems_changed.connect(self.settings_changed)
        self._show()

    # -- following the settings ------------------------------------------------------------------

    def refresh(self) -> None:
        # The same values Start refuses get no estimate. Not counted: the data folders (they do not
        # change the memory) and the model (the estimate says itself whether it can read its sizes:
        # the built-in ones of the known models need no download).
        blockers = [p for p in self.state.start_blockers() if p.key not in OWN_ANSWER]
        if blockers:
            self.job.cancel()
            self._asked = None
            self.estimate, self.error = None, f"fix the settings first: {blockers[0].message}"
            self._show()
            return
        if self._asked == self.state.config and (self.estimate is not None or self.error is not None or self.job.is_busy()):
            return  # only the problems changed, not the settings: the estimate stands
        self._asked = copy.deepcopy(self.state.config)
        if self.error is not None and self.error.startswith("fix the settings first"):
            self.error = None
        self.job.request(self._asked)

    def engine_loaded(self) -> None:
        """torch is imported (the engine's warm-up ended): the GPU's capacity can be asked for."""
        if not self.gpu_checked and not self.gpu_job.is_busy():
            self.gpu_job.request(None, now=True)

    def settle(self, timeout_ms: int = 30_000) -> bool:
        return self.job.wait(timeout_ms) and self.gpu_job.wait(timeout_ms)

    def shutdown(self) -> None:
        self.job.shutdown()
        self.gpu_job.shutdown()

    # -- reports ---------------------------------------------------------------------------------

    def _estimated(self, _config: dict[str, Any], estimate: Estimate) -> None:
        self.estimate, self.error = estimate, None
        self._show()

    def _failed(self, _config: dict[str, Any], message: str) -> None:
        self.estimate, self.error = None, message
        self._show()

    def _busy(self, busy: bool) -> None:
        self.busy_bar.setVisible(busy and self.estimate is None and self.error is None)

    def _gpu_found(self, _argument: Any, gpu: tuple[int, str] | None, error: str | None = None) -> None:
        self.gpu_checked, self.gpu = True, gpu
        self._gpu_error = error
        self._show()

    # -- showing ---------------------------------------------------------------------------------

    def _show(self) -> None:
        estimate = self.estimate
        self.error_label.setText(f"No estimate: {self.error}" if self.error else "")
        self.error_label.setVisible(bool(self.error))
        for name, value, bar, note in self.part_rows.values():
            for widget in (name, value, bar, note):
                widget.setVisible(estimate is not None)
        self._show_model_parts(estimate)
        if estimate is None:
            self.peak_label.setText("-")
            self.needed_label.setText("")
            self.caching_label.setText("")
            self.model_label.setText("")
            self.gpu_label.setText(self._gpu_text(None))
            return
        self.peak_label.setText(gib(estimate.peak_bytes))
        self.needed_label.setText(f"About {gib(estimate.needed_bytes)} of GPU memory needed, with the CUDA context and the allocator's reserve.")
        notes = part_notes(estimate)
        peak = estimate.peak_bytes or 1
        for key, (_name, value, bar, note) in self.part_rows.items():
            amount = estimate.parts.get(key, 0)
            value.setText(gib(amount))
            bar.setValue(round(1000 * amount / peak))  # the part's share of the peak
            bar.setToolTip(f"{100 * amount / peak:.0f}% of the estimated peak")
            note.setText(notes.get(key, ""))
        self.caching_label.setText(caching_text(estimate))
        d = estimate.details
        cache = "".join(f" The text cache holds {size / 2**20:.1f} MiB per caption of {name} (keep_loaded off)."
                        for name, size in (d.get("text_cache_bytes_per_caption") or {}).items())
        self.model_label.setText(
            f"{d.get('model')} ({d.get('configs_from')}). Largest sample: {d.get('frames')} frames, "
            f"{d.get('tokens')} tokens, batch {d.get('batch')}.{cache}"
        )
        self.gpu_label.setText(self._gpu_text(estimate))

    def _show_model_parts(self, estimate: Estimate | None) -> None:
        lines = model_part_lines(estimate) if estimate is not None else []
        if [name for name, _ in lines] != list(self.model_part_labels):
            for name_label, text_label in self.model_part_labels.values():
                for label in (name_label, text_label):
                    self.model_parts.removeWidget(label)
                    label.deleteLater()
            self.model_part_labels = {}
            for row, (name, _) in enumerate(lines):
                name_label, text_label = QLabel(name), muted_label()
                text_label.setObjectName(f"estimatePart_{name}")
                self.model_parts.addWidget(name_label, row, 0)
                self.model_parts.addWidget(text_label, row, 1)
                self.model_part_labels[name] = (name_label, text_label)
        for name, text in lines:
            self.model_part_labels[name][1].setText(text)

    def _gpu_text(self, estimate: Estimate | None) -> str:
        if not self.gpu_checked:
            return '<span style="color:gray">The GPU\'s memory shows here once the training engine has loaded.</span>'
        if self.gpu is None:
            reason = self._gpu_error or "No CUDA GPU found on this machine."
            return f'<span style="color:gray">{html.escape(reason)}</span>'
        total, name = self.gpu
        if estimate is None:
            return html.escape(f"GPU: {name}, {total / GIB:.1f} GiB")
        fits = estimate.fits(total)
        verdict = "fits" if fits else "does not fit"
        colour = FITS_COLOUR if fits else NO_FIT_COLOUR
        return f'{html.escape(name)}, {total / GIB:.1f} GiB: <b style="color:{colour}">{verdict}</b>'
