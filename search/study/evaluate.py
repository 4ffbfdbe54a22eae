"""One candidate, start to end: build the policy's model, fine-tune it, score it, compile it
and time it, into a TrialResult (an expected failure is TrialFailed, recorded by the study)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.backend.compile import Compiler, to_relax, traced_relax
from search.backend.measure import Anchor, Latency, compile_anchor, compile_and_time
from search.backend.predict import KernelLibrary, KernelSum, Prediction, deployed_form
from search.backend.provenance import Provenance
from search.compress.build import apply_precision, output_tolerance, restructure
from search.compress.policy import Policy
from search.compress.size import ModelStats, model_stats
from search.core.data import check_inputs, evaluate
from search.core.task import Task
from search.devices.lock import cpu_turn
from search.devices.target import TargetSpec
from search.finetune.distill import (
    Teacher,
    attach_training_transforms,
    distill,
    resume_distill,
)
from search.study.config import SearchConfig
from search.study.early_stop import Hopeless, checkpoints

TRAINABLE = "trainable.pt"  # a trial's fine-tuned fp32 weights, before precision is applied


def finetune_seed(run_seed: int, policy: Policy) -> int:
    """The fine-tune's seed: from the run's seed and the policy alone, so one policy gets one
    accuracy whichever worker runs it, first time or retried (the sampler's seed is the
    worker's own, so workers propose different trials)."""
    text = json.dumps([run_seed, policy.to_dict()], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


@dataclass(frozen=True)
class TrialResult:
    """What one candidate measured, and how."""

    val_accuracy: float  # chose: the study's objective
    test_accuracy: float  # reports: the front's figure (data that chose nothing)
    latency: Latency
    latency_source: Provenance  # how the latency was made
    stats: ModelStats  # params, FLOPs, and the ideal size (an estimate)
    size_bytes: int  # the weight bytes of the compiled artifact, measured from it
    weight_dtypes: dict[str, int]  # those bytes by dtype (what the graph really reads)
    finetune_s: float
    compile_s: float
    tuning_s: float
    kernels: int  # tunable kernels in the compiled graph
    new_kernels: int  # of which were tuned for this trial (the rest came from the database)


class Evaluator:
    """A policy -> a measured candidate: build, fine-tune, quantize, compile, check, time."""

    def __init__(self, task: Task, target: TargetSpec, compiler: Compiler,
                 config: SearchConfig) -> None:
        self.task = task
        self.target = target
        self.compiler = compiler
        self.config = config
        self.teacher = Teacher(task.model, task.train)
        # beside the example, the compiled output is checked against PyTorch's on these
        self.checks = check_inputs(task.train, task.example)
        # predicted latency while searching: the candidate's kernels costed from the library
        self.library = KernelLibrary(compiler) if config.latency == "predicted" else None
        self._base: KernelSum | None = None  # the uncompressed model's kernels, costed
        # candidates imported for a prediction by torch.fx's trace (25x sooner than export):
        # set where it gives export's kernels on the uncompressed model
        self._traced = False
        self._anchor: Anchor | None = None
        # the study's reference latency of the uncompressed model (ms): the caller sets it from
        # the study; None until one candidate was timed, whose anchor time then becomes it
        self.reference_ms: float | None = None
        # the last candidate's fine-tuned weights before precision is applied (fp32, training
        # transforms attached): what `search finetune` continues from
        self.trainable: dict[str, torch.Tensor] | None = None

    def anchor(self) -> Anchor | None:
        """The uncompressed model, compiled once per process, that candidates are timed against
        (config `interleave`)."""
        if self.config.interleave and self._anchor is None:
            self._anchor = compile_anchor(self.task.model, self.task.example, self.compiler,
                                          self.target)
        return self._anchor

    def base_sum(self) -> KernelSum:
        """The uncompressed model's kernels costed from the library (once complete)."""
        assert self.library is not None
        if self._base is None or not self._base.complete:
            model, example = self.task.model.eval(), self.task.example
            kernels = self.compiler.kernels_of(to_relax(model, example))
            self._base = self.library.kernel_sum(kernels)
            traced = traced_relax(model, example)
            self._traced = traced is not None and self.compiler.same_kernels(
                self.compiler.kernels_of(traced), kernels)
        return self._base

    def _predict(self, deployed: nn.Module, progress: Any | None) -> Prediction | None:
        """A deployed candidate's latency and weight bytes from the kernel library; None where
        some kernel cannot be costed (the caller measures it whole). Imported by torch.fx's
        trace where that gave export's kernels on the uncompressed model (`base_sum`), else
        exported."""
        assert self.library is not None and self.reference_ms is not None
        base = self.base_sum()
        traced = traced_relax(deployed, self.task.example) if self._traced else None
        mod = traced if traced is not None else to_relax(deployed, self.task.example)
        return self.library.predict(mod, base, self.reference_ms, self.target, progress)

    @property
    def compiled_anchor(self) -> Anchor | None:
        """The anchor if this process compiled one (for the run's later timings), else None."""
        return self._anchor

    def __call__(self, policy: Policy, progress: Any | None = None,
                 hopeless: Hopeless | None = None, curve: dict[str, float] | None = None
                 ) -> tuple[TrialResult, nn.Module]:
        """`curve` collects the validation accuracy at the fine-tune's checkpoints; with
        `hopeless` (and a predicted latency) a dominated candidate raises StoppedEarly."""
        return self._evaluate(policy, progress, hopeless, curve)

    def _evaluate(self, policy: Policy, progress: Any | None, hopeless: Hopeless | None,
                  curve: dict[str, float] | None
                  ) -> tuple[TrialResult, nn.Module]:
        task = self.task
        model = restructure(task.model, policy, task.example, task.train, task.loss)
        identity = all(lp.is_identity for lp in policy.layers.values())
        predicted, predict_s = None, 0.0
        predicts = self.library is not None and not identity and self.reference_ms is not None
        if predicts and hopeless is not None:
            # early stopping needs the latency and size before the fine-tune: predicted from
            # a copy in its deployed form (the baseline, measured whole, set the reference)
            start = time.perf_counter()
            predicted = self._predict(deployed_form(model, policy, task.train), progress)
            predict_s = time.perf_counter() - start
        start = time.perf_counter()
        if not identity:
            options = self.config.finetune_options()
            penalized = attach_training_transforms(model, policy, options)
            on_step = None
            if curve is not None and hopeless is not None and predicted is not None:
                on_step = hopeless.on_step(model, task.val, task.metric, options.steps,
                                           predicted.ms, predicted.weights.total,
                                           curve)
            elif curve is not None:
                on_step = checkpoints(model, task.val, task.metric, options.steps, curve)
            distill(model, self.teacher, task.train, options, task.loss,
                    seed=finetune_seed(self.config.seed, policy), guard=cpu_turn,
                    penalized=penalized, on_step=on_step)
            self.trainable = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.trainable = None
        model = apply_precision(model, policy, task.train)
        with cpu_turn():  # (not while a candidate is timed on this CPU)
            val_accuracy = evaluate(model, task.val, task.metric)
            test_accuracy = evaluate(model, task.test, task.metric)
        finetune_s = time.perf_counter() - start
        if predicts and hopeless is None:
            # otherwise predicted from the deployed model itself: its kernels and weight bytes
            # do not depend on the weights' values, and its precision is applied already
            start = time.perf_counter()
            predicted = self._predict(model, progress)
            predict_s = time.perf_counter() - start
        stats = model_stats(model, policy, task.example)
        if predicted is not None:
            latency = Latency(predicted.ms, predicted.ms, predicted.ms, 0, ratio=predicted.ratio)
            return TrialResult(val_accuracy, test_accuracy, latency, predicted.source, stats,
                               predicted.weights.total, predicted.weights.by_dtype,
                               finetune_s, predict_s,
                               0.0, predicted.kernels.kernels, 0), model

        anchor = self.anchor()
        timed = compile_and_time(model, task.example, self.compiler, self.target,
                                 atol=output_tolerance(policy), progress=progress,
                                 anchor=anchor, checks=self.checks)
        latency, compiled, source = timed.latency, timed.compiled, timed.source
        if self.reference_ms is None and latency.anchor_ms is not None:
            self.reference_ms = latency.anchor_ms  # what predictions are scaled by
        return TrialResult(val_accuracy, test_accuracy, latency, source, stats,
                           compiled.weights.total, compiled.weights.by_dtype, finetune_s,
                           timed.compile_s,
                           compiled.tuning_s, compiled.tasks, compiled.new_tasks), model


@dataclass(frozen=True)
class MoreSteps:
    """A fine-tune continued from a candidate's saved weights: the deployed model, the weights
    to continue from again, and its accuracy on both held-out splits."""

    model: nn.Module  # precision applied: what is deployed
    trainable: dict[str, torch.Tensor]  # fp32, training transforms attached
    val_accuracy: float
    test_accuracy: float
    seconds: float


def more_steps(task: Task, policy: Policy, trainable: dict[str, torch.Tensor], steps: int,
               config: SearchConfig, seed: int, teacher: Teacher | None = None) -> MoreSteps:
    """`steps` more distillation steps from a fine-tune's weights (the same transforms), then
    the precision again. The structure is unchanged, so latency and size stand. One path for
    the front's recovery steps (search.study.recovery) and `search finetune`. `teacher`: the
    uncompressed model's outputs, computed once for several calls."""
    start = time.perf_counter()
    options = dataclasses.replace(config.finetune_options(), steps=steps)
    trained = resume_distill(task.model, policy, task.example, trainable,
                             teacher or Teacher(task.model, task.train), task.train, options,
                             task.loss, seed=seed, guard=cpu_turn)
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    model = apply_precision(trained, policy, task.train)
    with cpu_turn():
        val, test = evaluate(model, task.val, task.metric), evaluate(model, task.test,
                                                                      task.metric)
    return MoreSteps(model.eval(), state, val, test, time.perf_counter() - start)
