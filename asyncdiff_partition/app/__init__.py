"""The commands: what ``asyncdiff-partition run / profile / plan / demo / export-onnx`` do, above the library.

Each module turns one command's options into calls of the stages below it (``core``, ``fx``,
``onnx``, ``runtime``, ``pipelines``); nothing below imports this layer.
"""
