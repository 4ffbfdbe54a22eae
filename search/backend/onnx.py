"""ONNX: export a model (the standard artifact), check it and time it in ONNX Runtime (the
reference runtime the benchmarks compare TVM with)."""

from __future__ import annotations

import inspect
import io
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.compress.build import output_error
from search.core.data import Inputs, as_inputs
from search.core.errors import TrialFailed, UserError
from search.devices.target import Measurement


def input_names(model: nn.Module, example: Inputs) -> list[str]:
    """ONNX input names: the forward's own parameter names (input_ids, attention_mask, ...)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= len(example):
        return params[:len(example)]
    return ["input"] if len(example) == 1 else [f"input{i}" for i in range(len(example))]


def _export(model: nn.Module, example: Any, f: Any) -> None:
    """TorchScript-based exporter: no onnxscript graph rewriting, stable op set 17."""
    inputs = as_inputs(example)
    torch.onnx.export(model.eval(), inputs, f, input_names=input_names(model, inputs),
                      output_names=["output"], opset_version=17, dynamo=False)


def to_onnx(model: nn.Module, example: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export(model, example, str(path))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"model does not export to ONNX: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_onnx(path: Path, example: Any, reference: torch.Tensor, atol: float,
               more: Sequence[tuple[Any, torch.Tensor]] = ()) -> float:
    """Run the ONNX file in ONNX Runtime on `example` and `more`'s inputs; its outputs must
    match PyTorch's (search.compress.build.output_error). Returns the largest error."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pairs = [(sess.run(None, onnx_feed(sess, x))[0], ref.detach().float().numpy())
             for x, ref in [(example, reference), *more]]
    wrong = output_error(pairs, atol)
    if wrong is not None:
        raise UserError(f"ONNX Runtime output differs from PyTorch ({wrong})")
    return max(float(np.abs(out - ref).max()) for out, ref in pairs)


def ort_session_bytes(model: nn.Module, example: Any) -> bytes:
    """The model as ONNX bytes (for benchmarks that time ONNX Runtime on the same model)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(model, example, buf)
    return buf.getvalue()


def time_onnxruntime(onnx_bytes: bytes, example: Any, settings: Measurement) -> float:
    """The reference runtime alone: median ms of ONNX Runtime (CPU, one thread) over `repeat`
    rounds, each timed like the TVM evaluator's (`ort_timer`)."""
    timer = ort_timer(onnx_bytes, example, settings)
    return statistics.median(timer() for _ in range(settings.repeat))


def ort_timer(onnx_bytes: bytes, example: Any, settings: Measurement) -> Callable[[], float]:
    """One round of ONNX Runtime (CPU, one thread), warmed up: ms per run over at least
    `number` runs and `min_repeat_ms`, as TVM's time evaluator times a round (so the two can
    be interleaved round by round: search.backend.measure.time_against_anchor)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = onnx_feed(sess, example)
    for _ in range(5):
        sess.run(None, feed)

    def one_round() -> float:
        n, start = 0, time.perf_counter()
        while n < settings.number or (time.perf_counter() - start) * 1e3 < settings.min_repeat_ms:
            sess.run(None, feed)
            n += 1
        return (time.perf_counter() - start) * 1e3 / n

    return one_round


def onnx_feed(session: Any, example: Any) -> dict[str, np.ndarray]:
    """Every input of an ONNX Runtime session, by position."""
    inputs = as_inputs(example)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise TrialFailed(f"the ONNX model takes {len(names)} inputs, the task gives "
                          f"{len(inputs)}")
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
