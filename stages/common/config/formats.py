"""The export formats ``export.formats`` may name: the one table of them (name -> file, runtime,
whether it needs calibration crops), plain data without torch or a runtime. params.py checks
``export.formats`` against it; stages.common.model.formats converts to each (its converters, by
name) and says what each is; stages.common.serving.classifiers loads each by its file's suffix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ONNX_FP32 = "onnx"  # the format export writes first; every other is converted from it


def sidecar(xml: Path) -> Path:
    """The metadata file beside an OpenVINO IR's ``.xml`` (stages.common.model.formats)."""
    return Path(xml).with_suffix(".json")


@dataclass(frozen=True)
class Format:
    name: str
    file: str  # its file in data/export: the one predict's --model takes
    runtime: str  # "onnxruntime" or "openvino"
    calibrated: bool  # quantized: its builder needs calibration crops

    def paths(self, path: Path) -> list[Path]:
        """Every file of the artifact whose main file is ``path``."""
        if self.runtime == "openvino":
            return [path, path.with_suffix(".bin"), sidecar(path)]
        return [path]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(ONNX_FP32, "model.onnx", "onnxruntime", False),
    Format("onnx_int8", "model.int8.onnx", "onnxruntime", True),
    Format("openvino_fp16", "model.fp16.xml", "openvino", False),
    Format("openvino_int8", "model.int8.xml", "openvino", True),
)}
