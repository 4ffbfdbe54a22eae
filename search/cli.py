"""`search`: the command line. Bad input ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from search.core.errors import InternalError, UserError

EXAMPLES = """\
examples:
  search run --target host --budget 1.5ms --trials 5   # the default: ImageNet MobileNetV2 (ELPV)
  search run --task search.tasks:minilm_text --budget 8ms   # a BERT-class encoder
  search run --target host --budget 800us --trials 30 --out runs/tight
  search run --config configs/default.yaml --target host --budget 5ms
  search run --out runs/host-5ms --resume        # continue an interrupted run
  search front runs/host-5ms                     # print the Pareto front again
  search finetune runs/host-5ms 7 --steps 600    # recover accuracy of a chosen point first
  search export runs/host-5ms 7                  # ONNX + TVM library + policy of trial 7
  search run --target raspberry-pi --rpc 192.168.1.20:9090 --budget 20ms
  search run --target raspberry-pi --tracker 10.0.0.2:9190 --key rpi4b
  search run --target host --budget 5ms --workers 2   # two trial workers, one study
  search run --storage postgresql://u:pw@db/search --study nightly --target host --budget 5ms
  search worker nightly --storage postgresql://u:pw@db/search   # on more machines
  search front --storage postgresql://u:pw@db/search --study nightly   # from any machine
  search show runs/host-5ms 7 --latency          # trial 7 layer by layer, each layer timed
  search compare runs/host-5ms runs/host-5ms-b   # two fronts: hypervolume, points dominated
  search targets                                 # devices this checkout knows
  search tune --target host --budget 30m         # the kernel library: later trials rarely tune
  search sweep configs/nightly.yaml              # nightly jobs + dated report; exit 3: regression
  optuna-dashboard sqlite:///runs/host-5ms/study.db --artifact-dir runs/host-5ms/artifacts
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search",
        description="Hardware-aware compression search: per-layer low-rank / channel pruning / "
                    "precision policies, each fine-tuned by distillation, compiled with TVM for "
                    "the target and timed for real; the result is a Pareto front of accuracy, "
                    "latency and size.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="search for compressed models within a latency budget",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--target", default="host",
                     help="device name (see `search targets`) or a target YAML file "
                          "[default: host]")
    run.add_argument("--budget", default="5ms",
                     help="latency budget per input, with a unit: 5ms, 800us, 0.005s "
                          "[default: 5ms]")
    run.add_argument("--task", metavar="MODULE:FUNCTION",
                     help="the task's entry point, e.g. search.tasks:minilm_text "
                          "[default: the config's, search.tasks:mobilenet_v2]")
    run.add_argument("--trials", type=int,
                     help="candidates to evaluate, seeds included [default: config, 16]")
    run.add_argument("--timeout",
                     help="stop starting trials after this long: 600, 90s, 20m, 2h")
    run.add_argument("--config", type=Path,
                     help="search config YAML (task entry point, fine-tune steps, tuning "
                          "trials, seeds); see configs/default.yaml")
    run.add_argument("--out", type=Path,
                     help="run folder [default: runs/TARGET-BUDGET]")
    run.add_argument("--seed", type=int, help="sampler and fine-tune seed [default: 0]")
    run.add_argument("--rpc", metavar="HOST:PORT",
                     help="time on the TVM RPC server there (overrides the target file)")
    run.add_argument("--tracker", metavar="HOST:PORT",
                     help="time on a device from a TVM RPC tracker's pool (with --key)")
    run.add_argument("--key", help="the tracker key of the device pool")
    run.add_argument("--resume", action="store_true",
                     help="continue the study in --out; its finished trials are kept")
    run.add_argument("--workers", type=int, default=1,
                     help="trial workers on this machine sharing the study (fine-tunes run in "
                          "parallel; tuning and timing take turns on the device) [default: 1]")
    run.add_argument("--storage", metavar="URL",
                     help="an Optuna RDB storage shared with workers on other machines, e.g. "
                          "postgresql://user:pw@db/search [default: RUN_FOLDER/study.db]")
    run.add_argument("--study", help="study name in --storage [default: the run folder's name]")
    run.add_argument("--artifacts", metavar="DIR|s3://BUCKET",
                     help="Optuna artifact store for the trials' weights and files: a folder "
                          "every worker reaches (NFS) or an S3 bucket "
                          "[default: RUN_FOLDER/artifacts]")

    worker = sub.add_parser(
        "worker", help="join a study on a shared storage and run its trials",
        description="Join a study made by `search run --storage URL` (its settings come from "
                    "the storage) and run trials until it has enough. Start as many as you "
                    "like, on any machine that can reach the storage and the device.")
    worker.add_argument("study", help="study name (`search run --study`, or its run folder name)")
    worker.add_argument("--storage", required=True, metavar="URL", help="the Optuna RDB URL")
    worker.add_argument("--out", type=Path,
                        help="folder for this worker's trial files [default: runs/STUDY]")
    worker.add_argument("--worker-id", type=int, default=0,
                        help="offsets the sampler seed so workers propose different trials "
                             "(fine-tunes seed from the run and the policy alone)")
    worker.add_argument("--artifacts", metavar="DIR|s3://BUCKET",
                        help="this host's path to the run's artifact store, where it is "
                             "mounted elsewhere [default: the path the run stored]")
    worker.add_argument("--rpc", metavar="HOST:PORT", help="this worker's device (overrides)")
    worker.add_argument("--tracker", metavar="HOST:PORT", help="this worker's tracker")
    worker.add_argument("--key", help="the tracker key")

    front = sub.add_parser(
        "front", help="print a run's Pareto front table (recomputed from a shared storage)",
        description="Print the Pareto front of a run folder. A run on a shared storage (or "
                    "--storage URL --study NAME, from any machine) is recomputed from the "
                    "study as it is now, the trials of every worker and host included, and "
                    "written into the folder; `search export/show/finetune FOLDER N` then "
                    "fetch a trial's files from the artifact store.",
        epilog="examples:\n  search front runs/host-5ms\n"
               "  search front --storage postgresql://u:pw@db/search --study nightly "
               "--out runs/nightly\n  search export runs/nightly 7",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    front.add_argument("run_dir", type=Path, nargs="?",
                       help="run folder [with --storage: where to write it, default "
                            "runs/STUDY]")
    front.add_argument("--storage", metavar="URL", help="the study's Optuna RDB URL")
    front.add_argument("--study", help="the study's name in --storage")
    front.add_argument("--artifacts", metavar="DIR|s3://BUCKET",
                       help="this host's path to the run's artifact store [default: the "
                            "path the run stored]")
    front.add_argument("--json", action="store_true", help="print front.json instead")

    export = sub.add_parser("export", help="write a front point as ONNX + TVM library + policy")
    export.add_argument("run_dir", type=Path)
    export.add_argument("trial", type=int, help="trial number, as in the front table")
    export.add_argument("--out", type=Path, help="[default: RUN_DIR/export/trial_N]")

    finetune = sub.add_parser(
        "finetune", help="fine-tune a chosen front point longer before you export it",
        description="More distillation steps from the uncompressed model for one trial, from "
                    "its own fine-tuned weights; prints test accuracy before and after. "
                    "`search export` then writes the fine-tuned model.",
        epilog="example:\n  search finetune runs/host-5ms 7 --steps 600",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_argument("run_dir", type=Path)
    finetune.add_argument("trial", type=int, help="trial number, as in the front table")
    finetune.add_argument("--steps", type=int, default=500,
                          help="extra fine-tune steps [default: 500]")

    sub.add_parser("targets", help="list the devices a run can target, and how each is reached")

    tune = sub.add_parser(
        "tune", help="build a target's kernel library ahead of time (trials then rarely tune)",
        description="Tune, into the target's tuning database (shared by every run and sweep on "
                    "it), the kernels the task's search space produces: every uniform policy "
                    "and --samples random ones are built at the target's channel and rank "
                    "granularity, their fused kernels extracted and tuned largest estimated "
                    "share of the latency first, until --budget is spent. Run it again to go on.",
        epilog="examples:\n  search tune --target host --budget 30m\n"
               "  search tune --target host --config configs/default.yaml --samples 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("--target", default="host", help="device name or target YAML [host]")
    tune.add_argument("--task", metavar="MODULE:FUNCTION",
                      help="the task [default: the config's, search.tasks:mobilenet_v2]")
    tune.add_argument("--config", type=Path, help="search config YAML (knobs, choices, "
                                                   "tune_trials_per_task)")
    tune.add_argument("--samples", type=int, default=24,
                      help="random policies sampled besides the uniform ones [default: 24]")
    tune.add_argument("--budget", help="stop starting new kernels after this long: 600, 20m, "
                                       "2h [default: until every kernel is tuned]")

    show = sub.add_parser("show", help="a trial layer by layer: knobs, params and bytes before "
                                       "-> after, per-layer latency, sensitivity")
    show.add_argument("run_dir", type=Path)
    show.add_argument("trial", type=int, help="trial number, as in the front table")
    show.add_argument("--latency", action="store_true",
                      help="compile and time every layer alone, before and after (slow: "
                           "minutes on a big model; cached in the trial's layers.json)")

    compare = sub.add_parser("compare", help="compare two runs' fronts: hypervolume, points "
                                             "dominated, policies in common")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.add_argument("--force", action="store_true",
                         help="compare runs of different targets or tasks anyway")

    sweep = sub.add_parser(
        "sweep", help="run a list of (task, target, budget) jobs and report how fronts moved",
        description="Run every job of a sweep file as a normal run in OUT/DATE/JOB, write\n"
                    "OUT/DATE/report.md and report.json, and compare each front with the job's\n"
                    "front in the most recent earlier sweep (the rule: search/sweep.py).",
        epilog="exit codes:\n"
               "  0  no regression and no failed job\n"
               "  2  bad sweep file (one line), nothing run\n"
               "  3  a front point regressed: slower or less accurate beyond noise (printed)\n"
               "  4  a job failed (one line each; wins over 3)\n"
               "example:\n  search sweep configs/nightly.yaml --date 2025-01-31",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("sweep_file", type=Path, help="sweep YAML, e.g. configs/nightly.yaml")
    sweep.add_argument("--date", help="the sweep's folder name, YYYY-MM-DD [default: today]")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from search.api import search
    from search.study.config import parse_timeout_s
    from search.study.runfolder import RunInfo
    from search.study.storage import redact

    if args.resume and args.out is None:
        raise UserError("--resume needs --out RUN_FOLDER (the folder of the run to continue)")
    out = args.out or Path("runs") / f"{Path(args.target).stem}-{args.budget.strip()}"
    device = {k: v for k, v in (("rpc", args.rpc), ("tracker", args.tracker),
                                ("key", args.key)) if v}
    settings = {}
    if args.timeout is not None:
        settings["timeout"] = parse_timeout_s(args.timeout)
    if args.seed is not None:
        settings["seed"] = args.seed
    try:
        front = search(args.task, args.target, args.budget, trials=args.trials, out=out,
                       config=args.config, resume=args.resume, workers=args.workers,
                       storage=args.storage, study=args.study, device=device or None,
                       artifacts=args.artifacts, **settings)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished trials are kept. Continue with: "
              f"search run --out {out} --resume", file=sys.stderr)
        return 130
    data, info = front.data, RunInfo.load(out)
    store = info.artifact_location(out)  # (optuna-dashboard opens a folder store)
    dashboard_store = "" if store.startswith("s3://") else f" --artifact-dir {store}"
    print(front.table())
    t = data["tuning"]
    print(f"tuning: {t['kernels_tuned']} new kernels, {t['seconds']:.0f} s "
          f"({t['trials_per_kernel']} MetaSchedule trials each; database {t['database']})")
    print(f"run folder {out}: front.json, front.csv, pareto.png, front/*.yaml; study: "
          f"optuna-dashboard {redact(info.url(out))}{dashboard_store}; wall time "
          f"{data['wall_s']:.0f} s")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from search.jobs.run import run_worker

    device = {k: v for k, v in (("rpc", args.rpc), ("tracker", args.tracker),
                                ("key", args.key)) if v}
    out = args.out or Path("runs") / args.study
    done = run_worker(args.study, args.storage, out, args.worker_id, device, args.artifacts)
    print(f"worker {args.worker_id}: {done} trials finished; files in {out}")
    return 0


def _cmd_front(args: argparse.Namespace) -> int:
    from search.jobs.run import joined_run, refresh_front
    from search.report.compare import load_front
    from search.report.front import table
    from search.study.runfolder import RunInfo

    if args.storage or args.study:
        if not (args.storage and args.study):
            raise UserError("a front from a shared storage needs both --storage URL and "
                            "--study NAME")
        run_dir = args.run_dir or Path("runs") / args.study
        info, _ = joined_run(args.study, args.storage, run_dir, args.artifacts)
        data = refresh_front(run_dir, info)
    elif args.run_dir is None:
        raise UserError("name a run folder (search front RUN_FOLDER), or a shared study "
                        "(search front --storage URL --study NAME)")
    elif (args.run_dir / "run.yaml").exists() and RunInfo.load(args.run_dir).storage:
        data = refresh_front(args.run_dir, RunInfo.load(args.run_dir))  # (other hosts' too)
    else:
        if not (args.run_dir / "front.json").exists():
            raise UserError(f"no front.json in {str(args.run_dir)!r}: is it a finished run "
                            f"folder?")
        _, data = load_front(args.run_dir)  # (checks run.yaml and front.json: one-line errors)
    print(json.dumps(data, indent=1) if args.json else table(data))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from search.report.export import export_trial

    out = args.out or args.run_dir / "export" / f"trial_{args.trial}"
    result = export_trial(args.run_dir, args.trial, out)
    kinds = ", ".join(f"{n / 1024:,.0f} KiB {dtype}"
                      for dtype, n in sorted(result.weight_bytes.by_dtype.items()))
    print(f"TVM library {result.tvm_library}  (load with tvm.runtime.load_module, run with "
          f"relax.VirtualMachine); weights {result.weight_bytes.total:,} bytes, read from the "
          f"file ({kinds})")
    print(f"ONNX        {result.onnx}  (ONNX Runtime matches PyTorch, max abs error "
          f"{result.onnx_max_abs_error:.2g})")
    for note in result.notes:
        print(f"            note: {note}")
    print(f"policy      {result.policy}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from search.api import open_front

    done = open_front(args.run_dir).finetune(args.trial, args.steps)
    print(f"trial {done.trial}: {done.steps} more fine-tune steps in {done.seconds:.0f} s: test "
          f"accuracy {100 * done.test_before:.2f}% -> {100 * done.test_after:.2f}% (val "
          f"{100 * done.val_before:.2f}% -> {100 * done.val_after:.2f}%)")
    print(f"weights {done.weights}; `search export {args.run_dir} {done.trial}` now writes "
          f"this model")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from search.jobs.sweep import SweepConfig, run_sweep

    cfg = SweepConfig.load(args.sweep_file)
    try:
        result = run_sweep(cfg, args.date)
    except KeyboardInterrupt:
        print("\ninterrupted; finished jobs are kept in their run folders", file=sys.stderr)
        return 130
    for jr, reg in result.regressions:
        print(f"REGRESSION {jr.job.name} (since {jr.moved.date if jr.moved else '?'}): "
              f"{reg.text()}")
    for jr in result.failed:
        print(f"search: job {jr.job.name} failed: {jr.error}", file=sys.stderr)
    print(f"report: {result.folder / 'report.md'} ({len(result.regressions)} regression(s), "
          f"{len(result.failed)} failed job(s))")
    return result.exit_code()


def _cmd_show(args: argparse.Namespace) -> int:
    from search.report.show import show

    print(show(args.run_dir, args.trial, measure=args.latency))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from search.report.compare import compare, comparison_table

    print(comparison_table(compare(args.run_a, args.run_b, force=args.force)))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    import dataclasses

    from search.jobs.tune import tune_target
    from search.study.config import SearchConfig, parse_timeout_s

    config = SearchConfig.load(args.config)
    if args.task:
        config = dataclasses.replace(config, task=args.task)
    config.check("settings")
    budget = None if args.budget is None else parse_timeout_s(args.budget)
    report = tune_target(args.target, config, args.samples, budget)
    print(report.summary())
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from search.devices.target import available, load_target

    print(f"{'target':<16} {'reached':<26} {'hardware arithmetic':<24} description")
    for name in available():
        t = load_target(name)
        reach = "needs --rpc or --tracker" if t.cross_compiler and t.device().local else t.reach
        hw = " ".join(p for p, native in t.hardware_precisions().items() if native) or "fp32"
        print(f"{name:<16} {reach:<26} {hw:<24} {t.description}")
    print("(16-bit floats without hardware arithmetic run emulated through fp32: slower; a "
          "trial using one lists it under software_precisions)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 1 a bug (an internal error inside a trial: one
    line, the traceback in RUN/error.log); 2 bad input (one line, before any work); 3 a run
    that finished with nothing to pick from (its baseline or every candidate failed: one line,
    after the front is written); 130 interrupted; `search sweep` adds its own (3, 4)."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree notices
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    handler = {"run": _cmd_run, "front": _cmd_front, "export": _cmd_export,
               "finetune": _cmd_finetune,
               "targets": _cmd_targets, "worker": _cmd_worker, "tune": _cmd_tune,
               "sweep": _cmd_sweep, "show": _cmd_show, "compare": _cmd_compare}[args.command]
    try:
        return handler(args)
    except (UserError, InternalError) as exc:  # exit 2: bad input, 3: no result, 1: a bug
        print(f"search: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
