"""torch.onnx.export with the settings every export here uses, and reproducible bytes.

The dynamo exporter records, for every node, the Python stack that produced it, with absolute
file paths: the same model exported from another folder (a clone, a CI checkout) would give
other bytes. Those debugging notes are removed, so an ONNX file depends on the model alone.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import onnx
import torch

from .errors import OpenLLMError


def export_program(module: torch.nn.Module, args: tuple, error: type[OpenLLMError], **options: Any) -> onnx.ModelProto:
    """The ONNX model of ``module`` called with ``args`` (``options`` go to torch.onnx.export).

    A failure raises ``error`` with the exporter's first line.
    """
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))  # exporter chatter
            program = torch.onnx.export(module.eval(), args, dynamo=True, external_data=False, verbose=False,
                                        **options)
    except Exception as exc:  # the exporter raises many kinds
        raise error(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    finally:
        quiet.setLevel(level)
    return without_debug_notes(program.model_proto)


def without_debug_notes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the per-node metadata (stack traces with file paths, FX names) the exporter adds."""
    for graph in [proto.graph, *(f for f in proto.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
    return proto
