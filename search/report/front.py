"""The Pareto front of a run: front.json, front.csv, a plot, per-point policies, a table."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import optuna

from search.backend.provenance import Provenance
from search.compress.policy import Policy
from search.study.artifacts import WEIGHTS, ArtifactStore, drop_trial_files
from search.study.points import Point, failures_of, pareto, points_of


def write_front(run_dir: Path, study: optuna.Study, budget_ms: float, target: str,
                store: ArtifactStore | None = None) -> dict:
    """Write front.json / front.csv / pareto.png (+ .html with plotly) / front/*.yaml; the
    weights of points off the front are dropped (here and from the artifact `store`)."""
    points = points_of(study, budget_ms, run_dir)
    base = next((p for p in points
                 if study.trials[p.trial].user_attrs.get("uncompressed")), None)
    front = pareto(points)
    data = {
        "target": target,
        "budget_ms": budget_ms,
        "objectives": {"val_accuracy": "maximize", "latency_ms": "minimize",
                       "size_bytes": "minimize"},
        "accuracy": "test_accuracy is measured on the test split, which chose nothing; "
                    "the front and the sampler use val_accuracy",
        "size": "size_bytes: the weight bytes of the compiled TVM library, measured from it "
                "(what `search export` writes); ideal_size_bytes: an ESTIMATE, the weights in "
                "formats counted but not written (sparse + Huffman, codebooks, packed sub-8-bit)",
        "baseline": None if base is None else base.to_dict(),
        "emulated": any(p.latency_source.method == "emulated" for p in points),
        "points": [p.to_dict() for p in front],
        "trials": {"complete": len(points), "failed": failures_of(study)},
    }
    (run_dir / "front.json").write_text(json.dumps(data, indent=1))
    with open(run_dir / "front.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "test_accuracy", "val_accuracy", "latency_ms",
                         "latency_p25_ms", "latency_p75_ms", "latency_source", "size_bytes",
                         "ideal_size_bytes_estimate", "params", "flops", "feasible"])
        for p in front:
            writer.writerow([p.trial, p.test_accuracy, p.val_accuracy, p.latency_ms,
                             p.latency_p25_ms, p.latency_p75_ms, p.latency_source.label,
                             p.size_bytes, p.ideal_size_bytes, p.params, p.flops, p.feasible])
    on_front = {p.trial for p in front}
    # dominated now means dominated forever: their weights are not needed
    dominated = [p.trial for p in points if p.trial not in on_front]
    for trial in dominated:
        for name in WEIGHTS:
            (run_dir / "trials" / f"{trial:04d}" / name).unlink(missing_ok=True)
    if store is not None:
        drop_trial_files(study, store, dominated, WEIGHTS)
    policies = run_dir / "front"
    shutil.rmtree(policies, ignore_errors=True)
    policies.mkdir()
    for p in front:
        Policy.from_dict(p.policy).save(policies / f"trial_{p.trial:04d}.yaml")
    plot(run_dir, points, front, budget_ms, base, target)
    return data


def plot(run_dir: Path, points: list[Point], front: list[Point], budget_ms: float,
         base: Point | None, target: str) -> None:
    """Accuracy vs measured latency; marker area ~ the artifact's weight bytes (the ideal size,
    an estimate, is in the hover text of the HTML). PNG always, HTML with plotly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max((p.size_bytes for p in points), default=1)
    sizes = [20 + 300 * p.size_bytes / biggest for p in points]
    ax.scatter([p.latency_ms for p in points], [100 * p.test_accuracy for p in points], s=sizes,
               alpha=0.35, color="grey", label="all trials")
    ax.scatter([p.latency_ms for p in front], [100 * p.test_accuracy for p in front],
               s=[20 + 300 * p.size_bytes / biggest for p in front], color="tab:blue",
               label="Pareto front")
    for p in front:
        ax.annotate(f"#{p.trial}", (p.latency_ms, 100 * p.test_accuracy), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if base is not None:
        ax.scatter([base.latency_ms], [100 * base.test_accuracy], marker="x", color="black",
                   s=60,
                   label="uncompressed")
    ax.axvline(budget_ms, color="tab:red", linestyle="--", label=f"budget {budget_ms:g} ms")
    sources = sorted({p.latency_source.label for p in points})
    ax.set_xscale("log")
    ax.set_xlabel(f"latency, ms (median; {', '.join(sources)})")
    ax.set_ylabel("test accuracy, % (the split that chose nothing)")
    emulated = any(p.latency_source.method == "emulated" for p in points)
    ax.set_title(f"Pareto front on {target} (marker area ~ compiled weight bytes)"
                 + ("\nEMULATED latency: not the device's" if emulated else ""))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(fig)
    try:
        import plotly.graph_objects as go
    except ImportError:
        return
    fig2 = go.Figure()
    fig2.add_scatter(x=[p.latency_ms for p in points], y=[100 * p.test_accuracy for p in points],
                     mode="markers", name="all trials",
                     hovertext=[_hover(p) for p in points])
    fig2.add_scatter(x=[p.latency_ms for p in front], y=[100 * p.test_accuracy for p in front],
                     mode="markers+text", name="front",
                     text=[f"#{p.trial}" for p in front], hovertext=[_hover(p) for p in front])
    fig2.update_layout(xaxis_title="latency ms (measured)", yaxis_title="test accuracy %",
                       xaxis_type="log")
    fig2.write_html(run_dir / "pareto.html")


def _hover(p: Point) -> str:
    return (f"#{p.trial}: {_kib(p.size_bytes)} compiled, ideal {_kib(p.ideal_size_bytes)} "
            f"(estimate)")


def _kib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:,.0f} KiB" if n < 10 * 1024**2 else f"{n / 1024**2:,.1f} MiB"


def policy_summary(policy: dict[str, dict[str, Any]]) -> str:
    """Per-layer text from each knob's label: r=rank ratio (t=soft threshold, sp=spatial split),
    s=sparsity (/taylor, /fisher importance), b=bits or fp16/bf16, p=pruned, nm=N:M,
    k=shared-value bits."""
    return Policy.from_dict(policy).label()


def table(data: dict) -> str:
    """The front as a terminal table, fastest first, with ratios to the uncompressed model."""
    base = data.get("baseline")
    lines = [f"Pareto front on {data['target']} (budget {data['budget_ms']:g} ms); "
             f"{data['trials']['complete']} complete, {len(data['trials']['failed'])} failed"]
    if data.get("running"):
        lines.append(f"{data['running']} trial(s) still running on workers: run `search front` "
                     f"again later for the whole front")
    if data.get("emulated"):
        lines.append("EMULATED: latencies were timed under emulation, not on the device; "
                     "they rank candidates, they are not the device's latency")
    header = f"{'trial':>5} {'ok':>2} {'test %':>6} {'lat ms':>8} {'(IQR)':>13} {'speedup':>7} " \
             f"{'size':>10} {'smaller':>7} {'ideal (est.)':>12}  {'latency source':<22} policy"
    lines += [header, "-" * len(header)]
    for p in data["points"]:
        speed = f"{base['latency_ms'] / p['latency_ms']:.2f}x" if base else "-"
        small = f"{base['size_bytes'] / p['size_bytes']:.1f}x" if base else "-"
        iqr = f"{p['latency_p25_ms']:.2f}-{p['latency_p75_ms']:.2f}"
        more = "*" if p.get("recovered_steps") else " "  # (older front.json: none)
        lines.append(f"{p['trial']:>5} {'y' if p['feasible'] else 'n':>2} "
                     f"{100 * p['test_accuracy']:>6.2f}{more}{p['latency_ms']:>8.3f} {iqr:>13} "
                     f"{speed:>7} {_kib(p['size_bytes']):>10} {small:>7} "
                     f"{_kib(p.get('ideal_size_bytes')):>12}  "
                     f"{Provenance.from_dict(p['latency_source']).label:<22} "
                     f"{policy_summary(p['policy'])}")
    if base:
        lines.append(f"uncompressed (trial {base['trial']}): {100 * base['test_accuracy']:.2f}% "
                     f"{base['latency_ms']:.3f} ms {_kib(base['size_bytes'])} "
                     f"[{Provenance.from_dict(base['latency_source'])}]")
    ref = data.get("reference")
    if base and ref:
        ort_ms = ref["uncompressed_onnxruntime_fp32_ms"]
        how = ("timed as the trials are: its fastest round, interleaved with the uncompressed "
               "TVM model" if ref.get("timing") == "interleaved"
               else "the median of its repeats, timed alone")
        lines.append(f"reference: uncompressed under ONNX Runtime fp32 {ort_ms:.3f} ms ({how}); "
                     f"TVM compiled {base['latency_ms']:.3f} ms "
                     f"({ort_ms / base['latency_ms']:.2f}x ONNX Runtime's speed)")
    lines.append("ok: within the latency budget. test %: accuracy on the test split, which "
                 "chose nothing (the front is chosen on validation); *: after the recovery "
                 "steps given once the search is over to the points within the budget on or "
                 "near the front (the sampler saw every candidate's short fine-tune). Latency: "
                 "of the "
                 "TVM-compiled model, timed; interleaved with the uncompressed model, its "
                 "fastest round, with the quartiles of its rounds; alone, the median of its "
                 "repeats; predicted (an ESTIMATE, `ratio to uncompressed`): its kernels' "
                 "recorded times over the uncompressed model's, times the reference; size: the "
                 "weight bytes of the compiled "
                 "library, measured from it (what `search export` writes); ideal (est.): an "
                 "ESTIMATE of the weights in formats counted but not written (sparse + Huffman, "
                 "codebooks, packed sub-8-bit).")
    return "\n".join(lines)
