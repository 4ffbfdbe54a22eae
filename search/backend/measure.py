"""Compile and time: the one path every latency figure is made by (a trial, the per-layer
table's ops, a whole-model check, `search show`): compile with TVM, run once and check the
output against PyTorch's, then time the compiled artifact on the target."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from search.backend.compile import Compiled, to_relax
from search.backend.provenance import Provenance
from search.compress.build import output_error
from search.core.data import as_inputs
from search.core.errors import TrialFailed
from search.devices.device import Device
from search.devices.lock import device_lock
from search.devices.target import Measurement

# a candidate timed this much slower than the uncompressed model on transferred schedules is
# compiled again on its own tuned kernels (compile_and_time); above 1 by more than the timing's
# spread, so the uncompressed model itself (ratio 1) is not retuned by chance
SUSPECT_RATIO = 1.1
# ... and so is one no faster than it (ratio >= 1) that computes at most this share of its ops:
# a neighbour's schedule missed (bench/RESULTS.md 13.36: a 25 % channel cut, 0.60x the ops,
# timed 1.04x on 32 transferred kernels of 34; 0.70x on its own tuned kernels in 13.34). An
# int8 model computes as many ops (1.03x on the default task): 1.1 still applies to it
FEWER_OPS = 0.9
# the anchor is compiled and loaded this many times in a process and the rounds alternate over
# the copies (its figure: the mean of the copies' fastest rounds): the study's reference and
# the ratio beside each figure. Two copies would have steadied that 1.2-2.8 % against 3.5-3.7 %
# on 13.18's rounds re-read, but not in 13.27's live A/Bs on a noisy machine: one ships.
ANCHOR_COPIES = 1


@dataclass(frozen=True)
class Latency:
    """A measured latency with the interquartile spread of its rounds. Timed alone: the median
    over repeats. Timed against an anchor (the uncompressed model, interleaved round by
    round): the candidate's fastest round, the least disturbed, which separate processes agree
    on (bench/RESULTS.md 13.32), with its rounds' median and the ratio of its fastest round to
    the anchor's (the mean over the anchor's copies of each one's fastest round) beside it."""

    median_ms: float  # the figure: see above
    p25_ms: float
    p75_ms: float
    repeats: int
    emulated_by: str | None = None  # e.g. "qemu-aarch64": NOT the device's real latency
    ratio: float | None = None  # fastest candidate round / the anchor's, interleaved
    ratio_p25: float | None = None  # the candidate's rounds / the anchor's: quartiles
    ratio_p75: float | None = None
    anchor_ms: float | None = None  # the anchor's: mean over its copies of their fastest round
    raw_ms: float | None = None  # interleaved: the median of the candidate's rounds


@dataclass(frozen=True)
class Anchor:
    """The model every candidate is timed against, round by round: compiled `ANCHOR_COPIES`
    times per process (its kernels are in the tuning database), with its inputs."""

    executables: tuple[Any, ...]  # copies of one model, each built and loaded on its own
    example: Any
    flops: float = 0.0  # its kernels' ops (Compiled.flops); 0: unknown


@dataclass(frozen=True)
class Timed:
    """A compiled and timed model: its latency, how that was made, and the compile."""

    latency: Latency
    source: Provenance
    compiled: Compiled
    compile_s: float  # compiling, tuning included


def compile_and_time(model: torch.nn.Module, example: Any, compiler: Any, target: Any = None,
                     settings: Measurement | None = None, atol: float = 1e-3,
                     progress: Any | None = None, anchor: Anchor | None = None,
                     checks: Sequence[Any] = ()) -> Timed:
    """Compile `model` (with every input of `example`) with `compiler`, check its output against
    PyTorch's within `atol` (on `example` and the inputs `checks`, as
    search.compress.build.output_error says), and time it on the target, holding the target's
    device lock (one process at a time tunes and times on a device), interleaved with `anchor`
    when given. TrialFailed says why a candidate failed, also when a layer the policy made int8
    does not compile to an int8 kernel."""
    target = target or compiler.spec
    int8_layers = sum(1 for m in model.modules() if getattr(m, "computes_in_int8", False))
    with torch.no_grad():
        reference = model.eval()(*as_inputs(example))
        more = [(x, model(*as_inputs(x))) for x in checks]
    mod = to_relax(model, example)

    def build_and_time(transfer: bool | None) -> tuple[Compiled, Latency, float]:
        """Compile (transfer: None, the compiler's own choice), check and time."""
        start = time.perf_counter()
        compiled = compiler.compile(mod, progress) if transfer is None else \
            compiler.compile(mod, progress, transfer=transfer)
        compile_s = time.perf_counter() - start
        if compiled.int8_kernels < int8_layers:
            raise TrialFailed(f"{int8_layers - compiled.int8_kernels} of {int8_layers} int8 "
                              f"layers did not lower to int8 kernels (TVM would compute them "
                              f"on widened int32 operands); not timed as int8")
        latency = run_and_time(compiled.executable, example, reference,
                               settings or target.measurement, target.device(), atol=atol,
                               anchor=anchor, more=more)
        return compiled, latency, compile_s

    with device_lock(target):
        compiled, latency, compile_s = build_and_time(None)
        if compiler.can_tune and transfer_missed(compiled, latency, anchor):
            # NOTE: a neighbour's schedule can be far off (bench/RESULTS.md 13.20: 3.2x, where
            # 13.8 saw at most 1.32x); a candidate it makes slower than the uncompressed model
            # would mislead the sampler and fall off the front unretimed: it gets its own
            # kernels tuned, and is timed again
            compiled, latency, retune_s = build_and_time(False)
            compile_s += retune_s
    source = Provenance.timed(target.name, compiled.tuned, compiled.tasks, latency.emulated_by,
                              compiled.transferred)
    return Timed(latency, source, compiled, compile_s)


def transfer_missed(compiled: Compiled, latency: Latency, anchor: Anchor | None) -> bool:
    """Whether a candidate built on transferred schedules timed as a missed transfer does: it
    ran slower than the anchor by more than the timing's spread (SUSPECT_RATIO), or no faster
    while computing clearly fewer ops (FEWER_OPS)."""
    ratio = latency.ratio
    if not compiled.transferred or ratio is None:
        return False
    fewer = anchor is not None and anchor.flops > 0 and compiled.flops <= FEWER_OPS * anchor.flops
    return ratio > SUSPECT_RATIO or (fewer and ratio >= 1.0)


def compile_anchor(model: torch.nn.Module, example: Any, compiler: Any,
                   target: Any = None) -> Anchor:
    """The anchor for this process: `model` compiled `ANCHOR_COPIES` times (under the device
    lock, tuning what the database lacks, as any candidate)."""
    target = target or compiler.spec
    mod = to_relax(model.eval(), example)
    with device_lock(target):
        compiled = [compiler.compile(mod) for _ in range(ANCHOR_COPIES)]
    return Anchor(tuple(c.executable for c in compiled), example, compiled[0].flops)


def run_and_time(executable: Any, example: Any, reference: torch.Tensor,
                 settings: Measurement, device: Device | None = None, atol: float = 1e-3,
                 rtol: float = 1e-2, anchor: Anchor | None = None,
                 more: Sequence[tuple[Any, torch.Tensor]] = ()) -> Latency:
    """Run once and compare with `reference` (PyTorch's output), and on each of `more`'s inputs
    with its reference (search.compress.build.output_error), then time with the evaluator.

    On a device over RPC, a dropped session is retried once on a fresh one; a second failure
    fails the trial with its reason (never the study).
    """
    device = device or Device()
    if device.local:
        return _run_and_time(executable, example, reference, settings, None, device, atol, rtol,
                             anchor, more)
    for attempt in (1, 2):
        try:
            session = device.session()
            return _run_and_time(executable, example, reference, settings, session, device,
                                 atol, rtol, anchor, more)
        except TrialFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a device drop: one retry, then a failed trial
            if attempt == 2:
                raise TrialFailed(f"device {device.describe()} failed twice: "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from exc
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _run_and_time(executable: Any, example: Any, reference: torch.Tensor,
                  settings: Measurement, session: Any, device: Device, atol: float,
                  rtol: float, anchor: Anchor | None = None,
                  more: Sequence[tuple[Any, torch.Tensor]] = ()) -> Latency:
    import tvm
    from tvm import relax

    def load(exe: Any, name: str) -> Any:
        return exe if session is None else device.load(session, exe, name)

    dev = tvm.cpu() if session is None else session.cpu()
    emulation = None if session is None else device.emulation(session)
    vm = relax.VirtualMachine(load(executable, "candidate"), dev)

    def tensors(inputs: Any) -> list[Any]:
        return [tvm.runtime.tensor(t.numpy(), dev) for t in as_inputs(inputs)]

    xs = tensors(example)
    try:
        pairs = [(vm["main"](*xs).numpy(), reference)]
        pairs += [(vm["main"](*tensors(x)).numpy(), ref) for x, ref in more]
    except Exception as exc:  # noqa: BLE001
        if session is not None:
            raise  # maybe the device dropped: the caller retries
        raise TrialFailed(f"compiled model failed to run: {type(exc).__name__}: "
                          f"{_first_line(exc)}") from exc
    wrong = output_error([(out, ref.detach().float().numpy()) for out, ref in pairs], atol, rtol)
    if wrong is not None:
        raise TrialFailed(f"compiled output differs from PyTorch ({wrong})")
    timer = _timer(vm, dev, settings, xs)
    anchor_timers = [] if anchor is None else \
        _anchor_timers(anchor, dev, settings, lambda exe, i: load(exe, f"anchor{i}"))
    return timed_rounds(timer, settings, anchor_timers, emulation)


def time_against_anchor(timer: Callable[[], float], anchor: Anchor, target: Any) -> Latency:
    """Another runtime's rounds on this CPU (`timer`: one round's ms, warmed up) interleaved
    with the anchor's under the target's device lock, as a candidate's are: the same figure,
    so the two compare (the front's ONNX Runtime reference)."""
    import tvm

    with device_lock(target):
        return timed_rounds(timer, target.measurement,
                            _anchor_timers(anchor, tvm.cpu(), target.measurement))


def _anchor_timers(anchor: Anchor, dev: Any, settings: Measurement,
                   load: Callable[[Any, int], Any] = lambda exe, i: exe
                   ) -> list[Callable[[], float]]:
    import tvm
    from tvm import relax

    xs = [tvm.runtime.tensor(t.numpy(), dev) for t in as_inputs(anchor.example)]
    return [_timer(relax.VirtualMachine(load(exe, i), dev), dev, settings, xs)
            for i, exe in enumerate(anchor.executables)]


def timed_rounds(timer: Callable[[], float], settings: Measurement,
                 anchor_timers: Sequence[Callable[[], float]] = (),
                 emulation: str | None = None) -> Latency:
    """Time `timer` alone (`settings.repeat` rounds: the median and quartiles), or round by
    round with the anchor (`settings.rounds`, each round timing one of its copies in turn):
    the candidate's fastest round, and its ratio to the mean of the copies' fastest rounds."""
    samples: list[float] = []
    anchors: list[list[float]] = [[] for _ in anchor_timers]
    rounds = settings.rounds if anchor_timers else settings.repeat
    for i in range(rounds):  # NOTE: round by round, so both see the same load
        if anchor_timers:
            k = i % len(anchor_timers)
            anchors[k].append(anchor_timers[k]())
        samples.append(timer())
        if settings.cooldown_ms:
            time.sleep(settings.cooldown_ms / 1e3)
    p25, med, p75 = np.percentile(samples, [25, 50, 75])
    if not anchor_timers:
        return Latency(float(med), float(p25), float(p75), len(samples), emulation)
    # NOTE: the candidate's fastest round, not a ratio to the anchor's: on a shared machine
    # neighbours slow the uncompressed model (weights beyond the cache) far more than a small
    # candidate, so a ratio carries the anchor's noise, while load only ever adds time to the
    # candidate's own rounds (bench/RESULTS.md 13.18, 13.27, 13.32). The ratio, of the fastest
    # rounds of each (per-round ratios move with the load), is kept beside it; the anchor's
    # figure is the mean over its copies of their fastest rounds
    floor = float(np.mean([min(a) for a in anchors if a]))
    r25, r75 = np.percentile(np.array(samples) / floor, [25, 75])
    return Latency(min(samples), float(p25), float(p75), len(samples), emulation,
                   min(samples) / floor, float(r25), float(r75), floor, float(med))


def _timer(vm: Any, dev: Any, settings: Measurement, xs: list[Any]) -> Callable[[], float]:
    """One round's time in ms (settings.number runs, at least min_repeat_ms), warmed up.

    NOTE: TVM's cache flush (f_preproc="cache_flush_cpu_non_first_arg") evicts the call's
    arguments; our weights are constants inside the library, not arguments, so it would flush
    only the input. Agreement between processes comes from the anchor instead."""
    evaluator = vm.time_evaluator("main", dev, number=settings.number, repeat=1,
                                  min_repeat_ms=settings.min_repeat_ms)
    evaluator(*xs)  # warm-up: caches, page faults, thread pool
    return lambda: evaluator(*xs).mean * 1e3


