"""Nightly sweeps: run a list of (task, target, budget) jobs, report, and flag regressions.

`search sweep configs/nightly.yaml` runs each job as a normal run in
`<out>/<YYYY-MM-DD>/<job>/`, then compares each job's front with the same job's front in the most
recent earlier dated folder under `out` that holds one, and writes `report.md`, `report.json` and
one `front-moved-<job>.png` per compared job next to the run folders. A job that fails (bad
device, broken task, crash) is recorded with a one-line reason and the sweep goes on.

Regression rule (per job; previous = the earlier sweep's front points, current = today's):
- Only previous points within today's budget (latency_ms <= budget) are checked.
- A previous point p is *kept* when one current point c is both
  - as accurate within tolerance: c.accuracy >= p.accuracy - accuracy_tolerance (default 0.005:
    about two validation examples of the digits task; front.json does not carry the validation
    size, so the tolerance is a setting), and
  - as fast within noise: c.latency_ms <= p.latency_ms + slack, where
    slack = max(latency_tolerance * p.latency_ms, IQR(p) + IQR(c)),
    IQR = latency_p75_ms - latency_p25_ms of each timing, latency_tolerance defaults to 0.10.
- Every previous point that is not kept is a regression: there the front got slower or less
  accurate beyond noise. Size is not part of the rule (it is deterministic: a size change
  follows a policy change and shows in the table).
- An improvement is a current point that dominates a previous point beyond noise: at least as
  accurate and as fast, and more accurate by more than the tolerance or faster by more than
  the slack.
- The hypervolume is `search.report.show.hypervolume` (accuracy, latency, size; the reference is the
  larger uncompressed latency and size of the two runs), the same figure `search compare`
  prints.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from search.backend.provenance import Provenance
from search.core.errors import UserError
from search.core.settings import read_settings
from search.devices.target import load_target
from search.report.compare import hypervolume, objectives, reference_for
from search.study.config import SearchConfig, parse_duration_ms, parse_timeout_s

DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
JOB_KEYS = ("name", "task", "target", "budget", "config", "rpc", "tracker", "key")

EXIT_OK, EXIT_REGRESSION, EXIT_FAILED = 0, 3, 4


@dataclass(frozen=True)
class Job:
    """One (task, target, budget) run of a sweep."""

    name: str  # its folder in the dated sweep folder, and its identity across sweeps
    target: str  # a target name or YAML path
    budget: str  # as written, e.g. 5ms
    budget_ms: float
    task: str | None = None  # entry point; overrides the config's
    config: Path | None = None  # search config YAML; overrides the sweep's
    rpc: str | None = None  # device overrides, as --rpc / --tracker / --key
    tracker: str | None = None
    key: str | None = None

    def device(self) -> dict[str, str | None]:
        return {k: v for k, v in (("rpc", self.rpc), ("tracker", self.tracker),
                                  ("key", self.key)) if v}


@dataclass
class SweepConfig:
    """A sweep file: the jobs, where sweeps go, overrides and regression tolerances."""

    jobs: list[Job]
    out: Path = Path("sweeps")  # dated sweep folders go here
    config: Path | None = None  # default search config YAML for every job
    trials: int | None = None  # override every job's trials
    timeout: float | None = None  # override every job's timeout, seconds
    accuracy_tolerance: float = 0.005  # accuracy a point may lose before it counts (fraction)
    latency_tolerance: float = 0.10  # relative latency noise floor (IQRs may widen it)
    path: Path | None = None  # the file it was read from

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        """Read and check a sweep file; any problem is a one-line UserError."""
        data = read_settings(path, "sweep file", {f.name for f in fields(cls)} - {"path"},
                             "see configs/nightly.yaml")
        jobs = data.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise UserError(f"sweep file {path}: `jobs` must be a non-empty list of "
                            f"{{target, budget, ...}} mappings")
        try:
            cfg = cls(jobs=[_job(path, i, raw) for i, raw in enumerate(jobs, 1)],
                      out=Path(data.get("out") or "sweeps"),
                      config=Path(data["config"]) if data.get("config") else None,
                      trials=None if data.get("trials") is None else int(data["trials"]),
                      timeout=None if data.get("timeout") is None
                      else parse_timeout_s(str(data["timeout"])),
                      accuracy_tolerance=float(data.get("accuracy_tolerance", 0.005)),
                      latency_tolerance=float(data.get("latency_tolerance", 0.10)), path=path)
        except (TypeError, ValueError) as exc:
            raise UserError(f"sweep file {path}: {exc}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        where = f"sweep file {self.path}" if self.path else "sweep"
        if self.trials is not None and self.trials < 1:
            raise UserError(f"{where}: trials must be at least 1, got {self.trials}")
        if self.accuracy_tolerance < 0 or self.latency_tolerance < 0:
            raise UserError(f"{where}: accuracy_tolerance and latency_tolerance must be >= 0")
        names = [j.name for j in self.jobs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"{where}: more than one job named {', '.join(twice)}; give each "
                            f"a distinct `name`")
        for job in self.jobs:  # config files parse, with their overrides
            self.search_config(job)

    def search_config(self, job: Job) -> SearchConfig:
        """The job's search config: its file (or the sweep's), then the sweep's overrides."""
        config = SearchConfig.load(job.config or self.config)
        if job.task:
            config.task = job.task
        if self.trials is not None:
            config.trials = self.trials
        if self.timeout is not None:
            config.timeout = self.timeout
        return config


def _job(path: Path, index: int, raw: Any) -> Job:
    where = f"sweep file {path}, job {index}"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must be a mapping such as {{target: host, budget: 5ms}}")
    unknown = sorted(set(raw) - set(JOB_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(JOB_KEYS)}")
    missing = [k for k in ("target", "budget") if not raw.get(k)]
    if missing:
        raise UserError(f"{where}: needs {' and '.join(missing)}")
    target, budget = str(raw["target"]), str(raw["budget"]).strip()
    try:
        budget_ms = parse_duration_ms(budget)
        spec = load_target(target).with_device(raw.get("rpc"), raw.get("tracker"),
                                               raw.get("key"))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if spec.cross_compiler and spec.device().local:
        raise UserError(f"{where}: target {target!r} runs on a device: give the job "
                        f"`rpc: HOST:PORT` or `tracker: HOST:PORT` and `key: KEY`")
    name = str(raw.get("name") or f"{Path(target).stem}-{budget.replace(' ', '')}")
    if not NAME.fullmatch(name):
        raise UserError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
    config = raw.get("config")
    if config and not Path(config).exists():
        raise UserError(f"{where}: config file {str(config)!r} does not exist")
    return Job(name, target, budget, budget_ms, raw.get("task"),
               Path(config) if config else None, raw.get("rpc"), raw.get("tracker"),
               raw.get("key"))


# --- comparing two fronts --------------------------------------------------------------------

Point = dict[str, Any]  # one entry of front.json's "points"


def _iqr(p: Point) -> float:
    return max(0.0, p.get("latency_p75_ms", p["latency_ms"]) - p.get("latency_p25_ms",
                                                                     p["latency_ms"]))


def _slack(p: Point, c: Point, latency_tolerance: float) -> float:
    """How much slower c may be than p and still be the same speed: timing noise."""
    return max(latency_tolerance * p["latency_ms"], _iqr(p) + _iqr(c))


def _label(p: Point) -> str:
    return f"trial {p['trial']} ({100 * p['test_accuracy']:.2f}%, {p['latency_ms']:.3f} ms)"


@dataclass(frozen=True)
class Regression:
    """A previous front point no current point matches within tolerance and noise."""

    previous: Point
    best_at_latency: Point | None  # the most accurate current point as fast as it (with noise)
    fastest_at_accuracy: Point | None  # the fastest current point as accurate (with tolerance)

    def text(self) -> str:
        at_lat = ("nothing" if self.best_at_latency is None
                  else f"{100 * self.best_at_latency['test_accuracy']:.2f}% "
                       f"(trial {self.best_at_latency['trial']})")
        at_acc = ("nothing" if self.fastest_at_accuracy is None
                  else f"{self.fastest_at_accuracy['latency_ms']:.3f} ms "
                       f"(trial {self.fastest_at_accuracy['trial']})")
        return (f"{_label(self.previous)} is gone: as fast, the most accurate now is {at_lat}; "
                f"as accurate, the fastest now is {at_acc}")

    def to_dict(self) -> dict[str, Any]:
        best, fastest = self.best_at_latency, self.fastest_at_accuracy
        return {"previous": _slim(self.previous),
                "best_at_latency": None if best is None else _slim(best),
                "fastest_at_accuracy": None if fastest is None else _slim(fastest),
                "text": self.text()}


@dataclass(frozen=True)
class Improvement:
    """A current front point that dominates previous ones beyond noise."""

    current: Point
    beaten: list[Point]

    def text(self, since: str) -> str:
        return f"{_label(self.current)} dominates {since}'s " + ", ".join(map(_label, self.beaten))

    def to_dict(self) -> dict[str, Any]:
        return {"current": _slim(self.current), "beaten": [_slim(p) for p in self.beaten]}


def _slim(p: Point) -> Point:
    return {k: p[k] for k in ("trial", "test_accuracy", "latency_ms", "latency_p25_ms",
                              "latency_p75_ms", "latency_source", "size_bytes") if k in p}


def compare_fronts(previous: list[Point], current: list[Point], budget_ms: float,
                   accuracy_tolerance: float = 0.005, latency_tolerance: float = 0.10
                   ) -> tuple[list[Regression], list[Improvement]]:
    """Regressions (previous points lost) and improvements (current points that dominate
    previous ones beyond noise); the rule is in the module docstring."""
    regressions = []
    for p in (p for p in previous if p["latency_ms"] <= budget_ms):
        as_fast = [c for c in current
                   if c["latency_ms"] <= p["latency_ms"] + _slack(p, c, latency_tolerance)]
        as_good = [c for c in current
                   if c["test_accuracy"] >= p["test_accuracy"] - accuracy_tolerance]
        if not any(c in as_good for c in as_fast):
            regressions.append(Regression(
                p, max(as_fast, key=lambda c: c["test_accuracy"], default=None),
                min(as_good, key=lambda c: c["latency_ms"], default=None)))
    improvements = []
    for c in current:
        beaten = [p for p in previous
                  if c["test_accuracy"] >= p["test_accuracy"] and c["latency_ms"] <= p["latency_ms"]
                  and (c["test_accuracy"] > p["test_accuracy"] + accuracy_tolerance
                       or c["latency_ms"] < p["latency_ms"] - _slack(p, c, latency_tolerance))]
        if beaten:
            improvements.append(Improvement(c, beaten))
    return regressions, improvements


# --- running a sweep -------------------------------------------------------------------------


@dataclass
class Comparison:
    """How one job's front moved since its previous sweep."""

    date: str
    run_dir: Path
    previous_points: list[Point]
    regressions: list[Regression]
    improvements: list[Improvement]
    hypervolume: tuple[float, float]  # previous, current
    notes: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    job: Job
    run_dir: Path
    front: dict[str, Any] | None = None  # front.json's content, when the job finished
    error: str | None = None  # one line, when it did not
    seconds: float = 0.0
    moved: Comparison | None = None


@dataclass
class SweepResult:
    date: str
    folder: Path
    jobs: list[JobResult]

    @property
    def failed(self) -> list[JobResult]:
        return [j for j in self.jobs if j.error is not None]

    @property
    def regressions(self) -> list[tuple[JobResult, Regression]]:
        return [(j, r) for j in self.jobs if j.moved for r in j.moved.regressions]

    def exit_code(self) -> int:
        """4 if a job failed (its front is unknown, so it wins), else 3 on a regression."""
        return EXIT_FAILED if self.failed else EXIT_REGRESSION if self.regressions else EXIT_OK


def parse_date(text: str | None) -> str:
    if text is None:
        return dt.date.today().isoformat()
    try:
        if not DATE.fullmatch(text):
            raise ValueError
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise UserError(f"date {text!r} is not a date: use YYYY-MM-DD, e.g. 2025-01-31") from None


def run_sweep(cfg: SweepConfig, today: str | None = None,
              say: Callable[[str], None] = print) -> SweepResult:
    """Run every job (a failure is recorded, not raised), compare, and write the report."""
    from search.jobs.run import prepare, run_search

    date = parse_date(today)
    folder = cfg.out / date
    for job in cfg.jobs:
        if (folder / job.name / "study.db").exists():
            raise UserError(f"{str(folder / job.name)!r} already holds a run: this sweep ran "
                            f"on {date}; remove {str(folder)!r} or pass --date")
    result = SweepResult(date, folder, [])
    for i, job in enumerate(cfg.jobs, 1):
        run_dir = folder / job.name
        say(f"[{i}/{len(cfg.jobs)}] {job.name}: target {job.target}, budget {job.budget} ...")
        start = time.perf_counter()
        jr = JobResult(job, run_dir)
        try:
            target, info = prepare(job.target, job.budget_ms, cfg.search_config(job), run_dir,
                                   resume=False, device=job.device())
            jr.front = run_search(run_dir, target, info, resume=False, show_progress=False)
        except UserError as exc:
            jr.error = str(exc).splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - one job's crash must not end the sweep
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(traceback.format_exc())
            first = (str(exc).splitlines() or [""])[0]
            jr.error = f"{type(exc).__name__}: {first} (traceback: {run_dir / 'error.log'})"
        jr.seconds = time.perf_counter() - start
        if jr.front is not None:
            jr.moved = _compare(cfg, date, jr)
        say(f"[{i}/{len(cfg.jobs)}] {job.name}: "
            + (f"failed: {jr.error}" if jr.error else
               f"{len(jr.front['points']) if jr.front else 0} front points")
            + f" ({jr.seconds:.0f} s)")
        result.jobs.append(jr)
    write_report(cfg, result)
    return result


def previous_run(out: Path, date: str, name: str) -> tuple[str, Path] | None:
    """The most recent dated sweep folder before `date` that holds this job's front."""
    if not out.is_dir():
        return None
    dates = sorted((d.name for d in out.iterdir() if d.is_dir() and DATE.fullmatch(d.name)
                    and d.name < date), reverse=True)
    for d in dates:
        if (out / d / name / "front.json").is_file():
            return d, out / d / name
    return None


def _compare(cfg: SweepConfig, date: str, jr: JobResult) -> Comparison | None:
    found = previous_run(cfg.out, date, jr.job.name)
    if found is None or jr.front is None:
        return None
    prev_date, prev_dir = found
    try:
        prev = json.loads((prev_dir / "front.json").read_text())
        prev_points = list(prev["points"])
        for p in prev_points:  # (front.json before 0.3 had one "accuracy", on validation)
            p.setdefault("test_accuracy", p.get("accuracy"))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return Comparison(prev_date, prev_dir, [], [], [], (0.0, 0.0),
                          [f"previous front.json unreadable ({exc}); not compared"])
    points, budget = jr.front["points"], jr.job.budget_ms
    regressions, improvements = compare_fronts(prev_points, points, budget,
                                               cfg.accuracy_tolerance, cfg.latency_tolerance)
    notes = []
    if prev.get("target") != jr.front.get("target"):
        notes.append(f"the previous run was on target {prev.get('target')!r}")
    if prev.get("budget_ms") != budget:
        notes.append(f"the previous budget was {prev.get('budget_ms')} ms; previous points are "
                     f"checked against today's {budget:g} ms")
    sources = ({Provenance.from_dict(p["latency_source"]).label for p in prev_points
                if p.get("latency_source")},
               {Provenance.from_dict(p["latency_source"]).label for p in points
                if p.get("latency_source")})
    if sources[0] != sources[1]:
        notes.append(f"latency sources differ: {sorted(map(str, sources[0]))} then "
                     f"{sorted(map(str, sources[1]))}")
    return Comparison(prev_date, prev_dir, prev_points, regressions, improvements,
                      _hypervolumes(prev, jr.front), notes)


def _hypervolumes(previous: dict[str, Any], current: dict[str, Any]) -> tuple[float, float]:
    """Both fronts' hypervolume against one reference (as `search compare`)."""
    ref = reference_for(previous, current)
    return (hypervolume(map(objectives, previous["points"]), ref),
            hypervolume(map(objectives, current["points"]), ref))


# --- the report ------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 10 * 1024**2 else f"{n / 1024**2:,.1f} MiB"


def front_table(points: list[Point]) -> list[str]:
    """The front as a Markdown table, fastest first."""
    from search.report.front import policy_summary

    rows = ["| trial | ok | acc % | lat ms | IQR ms | size | latency source | policy |",
            "|---:|:-:|---:|---:|---:|---:|---|---|"]
    for p in points:
        rows.append(f"| {p['trial']} | {'y' if p['feasible'] else 'n'} | "
                    f"{100 * p['test_accuracy']:.2f} | {p['latency_ms']:.3f} | "
                    f"{p['latency_p25_ms']:.3f}-{p['latency_p75_ms']:.3f} | "
                    f"{_size(p['size_bytes'])} | {Provenance.from_dict(p['latency_source'])} | "
                    f"{policy_summary(p['policy'])} |")
    return rows


def plot_moved(path: Path, jr: JobResult, date: str) -> None:
    """Previous and current fronts on one plot; lost points circled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert jr.moved is not None and jr.front is not None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pts, style, label in ((jr.moved.previous_points, dict(color="grey", alpha=0.6),
                               f"{jr.moved.date}"),
                              (jr.front["points"], dict(color="tab:blue"), date)):
        pts = sorted(pts, key=lambda p: p["latency_ms"])
        xs, ys = [p["latency_ms"] for p in pts], [100 * p["test_accuracy"] for p in pts]
        ax.step(xs, ys, where="post", **style)
        ax.scatter(xs, ys, label=label, **style)
    lost = [r.previous for r in jr.moved.regressions]
    if lost:
        ax.scatter([p["latency_ms"] for p in lost], [100 * p["test_accuracy"] for p in lost], s=160,
                   facecolors="none", edgecolors="tab:red", linewidths=2, label="regression")
    ax.axvline(jr.job.budget_ms, color="tab:red", linestyle="--",
               label=f"budget {jr.job.budget_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (median)")
    ax.set_ylabel("accuracy, %")
    ax.set_title(f"{jr.job.name}: front on {jr.job.target}, {jr.moved.date} vs {date}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _job_markdown(jr: JobResult, date: str) -> list[str]:
    job = jr.job
    lines = [f"## {job.name}", "",
             f"target `{job.target}`, budget {job.budget} ({job.budget_ms:g} ms)"
             + (f", task `{job.task}`" if job.task else "")
             + (f", device {job.device()}" if job.device() else "")
             + f"; run folder [{job.name}/]({job.name}/); {jr.seconds:.0f} s", ""]
    if jr.error is not None or jr.front is None:
        return lines + [f"**failed**: {jr.error}", ""]
    trials = jr.front["trials"]
    lines += [f"{trials['complete']} trials complete, {len(trials['failed'])} failed; "
              f"the front:", "", *front_table(jr.front["points"]), "",
              f"![Pareto front of {job.name}]({job.name}/pareto.png)", ""]
    m = jr.moved
    if m is None:
        return lines + ["No earlier sweep of this job: nothing to compare with.", ""]
    hv0, hv1 = m.hypervolume
    lines += [f"### Moved since {m.date}", "",
              f"hypervolume (accuracy x latency x size, as a fraction of the box up to the "
              f"uncompressed model): "
              f"{hv0:.4f} -> {hv1:.4f} ({hv1 - hv0:+.4f})", "",
              f"![{job.name}: {m.date} vs {date}](front-moved-{job.name}.png)", ""]
    lines += [f"- note: {n}" for n in m.notes]
    lines += [f"- **regression: {r.text()}**" for r in m.regressions]
    lines += [f"- improvement: {i.text(m.date)}" for i in m.improvements]
    if not m.regressions and not m.improvements:
        lines.append("- no regression, no improvement beyond noise")
    return lines + [""]


def write_report(cfg: SweepConfig, result: SweepResult) -> None:
    """report.md (tables, plots, regressions in bold) and report.json, in the dated folder."""
    result.folder.mkdir(parents=True, exist_ok=True)
    for jr in result.jobs:
        if jr.moved is not None:
            plot_moved(result.folder / f"front-moved-{jr.job.name}.png", jr, result.date)
    code = result.exit_code()
    lines = [f"# Sweep {result.date}", "",
             f"{len(result.jobs)} jobs from `{cfg.path}`: "
             f"{len(result.jobs) - len(result.failed)} finished, {len(result.failed)} failed; "
             f"{len(result.regressions)} regression(s); exit code {code}.", "",
             "| job | target | budget | status | front points | moved since |",
             "|---|---|---|---|---:|---|"]
    for jr in result.jobs:
        status = ("**failed**" if jr.error else
                  f"**{len(jr.moved.regressions)} regression(s)**" if jr.moved
                  and jr.moved.regressions else "ok")
        lines.append(f"| [{jr.job.name}](#{jr.job.name.lower().replace('.', '')}) | "
                     f"{jr.job.target} | {jr.job.budget} | {status} | "
                     f"{len(jr.front['points']) if jr.front else '-'} | "
                     f"{jr.moved.date if jr.moved else '-'} |")
    lines += ["", f"Regression rule: a previous front point within budget must still be "
                  f"matched by a point at most {cfg.accuracy_tolerance:g} less accurate and no "
                  f"slower than max({100 * cfg.latency_tolerance:g}%, both IQRs) (see "
                  f"search/sweep.py).", ""]
    for jr in result.jobs:
        lines += _job_markdown(jr, result.date)
    (result.folder / "report.md").write_text("\n".join(lines))
    (result.folder / "report.json").write_text(json.dumps(_report_json(cfg, result), indent=1))


def _report_json(cfg: SweepConfig, result: SweepResult) -> dict[str, Any]:
    jobs = []
    for jr in result.jobs:
        m = jr.moved
        jobs.append({
            "name": jr.job.name, "target": jr.job.target, "budget_ms": jr.job.budget_ms,
            "task": jr.job.task, "device": jr.job.device(), "run_dir": str(jr.run_dir),
            "status": "failed" if jr.error else "ok", "error": jr.error,
            "seconds": round(jr.seconds, 1),
            "baseline": jr.front.get("baseline") if jr.front else None,
            "front": [_slim(p) for p in jr.front["points"]] if jr.front else None,
            "moved": None if m is None else {
                "since": m.date, "previous_run_dir": str(m.run_dir),
                "hypervolume": {"previous": m.hypervolume[0], "current": m.hypervolume[1]},
                "regressions": [r.to_dict() for r in m.regressions],
                "improvements": [i.to_dict() for i in m.improvements],
                "notes": m.notes}})
    return {"date": result.date, "sweep_file": str(cfg.path), "exit_code": result.exit_code(),
            "rule": {"accuracy_tolerance": cfg.accuracy_tolerance,
                     "latency_tolerance": cfg.latency_tolerance},
            "failed": len(result.failed), "regressions": len(result.regressions), "jobs": jobs}
