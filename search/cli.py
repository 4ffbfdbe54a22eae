"""`search`: the command line. Bad input ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from search.errors import UserError

EXAMPLES = """\
examples:
  search run --target host --budget 5ms          # the built-in digits task on this machine
  search run --target host --budget 800us --trials 30 --out runs/tight
  search run --config configs/default.yaml --target host --budget 5ms
  search run --out runs/host-5ms --resume        # continue an interrupted run
  search front runs/host-5ms                     # print the Pareto front again
  search export runs/host-5ms 7                  # ONNX + TVM library + policy of trial 7
  search run --target raspberry-pi --rpc 192.168.1.20:9090 --budget 20ms
  search run --target raspberry-pi --tracker 10.0.0.2:9190 --key rpi4b
  search targets                                 # devices this checkout knows
  optuna-dashboard sqlite:///runs/host-5ms/study.db   # browse every trial
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

    front = sub.add_parser("front", help="print a run's Pareto front table")
    front.add_argument("run_dir", type=Path)
    front.add_argument("--json", action="store_true", help="print front.json instead")

    export = sub.add_parser("export", help="write a front point as ONNX + TVM library + policy")
    export.add_argument("run_dir", type=Path)
    export.add_argument("trial", type=int, help="trial number, as in the front table")
    export.add_argument("--out", type=Path, help="[default: RUN_DIR/export/trial_N]")

    sub.add_parser("targets", help="list the devices a run can target, and how each is reached")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from search.config import SearchConfig, parse_duration_ms, parse_timeout_s
    from search.front import table
    from search.run import RunInfo, prepare, search

    if args.resume and args.out is None:
        raise UserError("--resume needs --out RUN_FOLDER (the folder of the run to continue)")
    out = args.out or Path("runs") / f"{Path(args.target).stem}-{args.budget.strip()}"
    device = {k: v for k, v in (("rpc", args.rpc), ("tracker", args.tracker),
                                ("key", args.key)) if v}
    if args.resume:  # target, budget and config come from the run folder
        info = RunInfo.load(out)
        target_name, budget_ms, config = info.target, info.budget_ms, info.config
        device = device or info.device
    else:
        target_name, budget_ms = args.target, parse_duration_ms(args.budget)
        config = SearchConfig.load(args.config)
    if args.trials is not None:
        config.trials = args.trials
    if args.timeout is not None:
        config.timeout = parse_timeout_s(args.timeout)
    if args.seed is not None:
        config.seed = args.seed
    target, info = prepare(target_name, budget_ms, config, out, resume=args.resume,
                           device=device)
    try:
        data = search(out, target, info, args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished trials are kept. Continue with: "
              f"search run --out {out} --resume", file=sys.stderr)
        return 130
    print(table(data))
    t = data["tuning"]
    print(f"tuning: {t['kernels_tuned']} new kernels, {t['seconds']:.0f} s "
          f"({t['trials_per_kernel']} MetaSchedule trials each; database {t['database']})")
    print(f"run folder {out}: front.json, front.csv, pareto.png, front/*.yaml, study.db "
          f"(optuna-dashboard sqlite:///{out}/study.db); wall time {data['wall_s']:.0f} s")
    return 0


def _cmd_front(args: argparse.Namespace) -> int:
    from search.front import table

    path = args.run_dir / "front.json"
    if not path.exists():
        raise UserError(f"no front.json in {str(args.run_dir)!r}: is it a finished run folder?")
    data = json.loads(path.read_text())
    print(json.dumps(data, indent=1) if args.json else table(data))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from search.export import export_trial

    out = args.out or args.run_dir / "export" / f"trial_{args.trial}"
    result = export_trial(args.run_dir, args.trial, out)
    print(f"ONNX        {result.onnx}  (ONNX Runtime matches PyTorch, max abs error "
          f"{result.onnx_max_abs_error:.2g})")
    print(f"TVM library {result.tvm_library}  (load with tvm.runtime.load_module, run with "
          f"relax.VirtualMachine)")
    print(f"policy      {result.policy}")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from search.target import available, load_target

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
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree notices
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    handler = {"run": _cmd_run, "front": _cmd_front, "export": _cmd_export,
               "targets": _cmd_targets}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
