"""The export formats and the ONNX runtimes: the choices of export.py's and test_seg.py's flags, importable
without PyTorch (the scripts parse their flags, ``--help`` included, before loading it)."""

__all__ = ["FORMATS", "ONNX_RUNTIMES", "OPSET", "TOLERANCE"]

FORMATS = ("torchscript", "onnx", "bundle")
#: The runtimes that run a ``model.onnx`` in test_seg.py.
ONNX_RUNTIMES = ("onnxruntime", "openvino")
#: The ONNX operator set of ``model.onnx`` (its card states it too).
OPSET = 18
#: The largest relative difference (see ``engine.export``) an export may have to the training form.
TOLERANCE = 1e-4
