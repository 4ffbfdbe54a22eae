"""Tuned fp32 Linear vs tuned int8 Linear (search/int8.py) at batch 1, on this host.

    python bench/bench_int8.py [--trials 32] [--db /tmp/int8bench] [--shapes 4096x5120,...]

Each shape is compiled three ways with the project's Compiler (MetaSchedule, same trials per
kernel): fp32 nn.Linear; int8 "plain" (R.matmul uint8 x int8 -> int32: a quarter of the weight
bytes, no dot-product instruction: the form Arm targets get today); int8 "vnni" (packed weights,
tensorized with vpdpbusd). Every compiled output is checked against torch first. Medians over
repeats; ratios are fp32 / int8 (above 1: int8 is faster). Tuning records go to --db.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.backend.int8 import enable_vnni, int8_kind, lower_int8
from search.backend.measure import run_and_time  # noqa: E402
from search.compress.int8 import calibrate, quantize_layers
from search.devices.target import Measurement, load_target  # noqa: E402

DEFAULT_SHAPES = "4096x5120,5120x5120,5120x10,512x512"


class One(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per kernel")
    ap.add_argument("--db", type=Path, default=Path("/tmp/int8bench"), help="tuning databases")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="KxN,... (in x out features)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    spec = load_target("host")
    enable_vnni()  # before any tuning: the stock dot_16x4_vnni does not build with TVM 0.27's LLVM
    host_kind = int8_kind(spec.tvm())
    settings = Measurement(number=10, repeat=args.repeat, min_repeat_ms=50)
    print(f"target {spec.tvm()}  int8 kind here: {host_kind}  trials/kernel: {args.trials}")
    forms = ["fp32", "plain"] + (["vnni"] if host_kind == "vnni" else [])
    compilers = {f: Compiler(spec, args.db / f, trials_per_task=args.trials) for f in forms}

    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        fp32 = One(k, n).eval()
        x = torch.relu(torch.randn(1, k))  # an MLP head's input is post-ReLU
        acts = calibrate(fp32, ["fc"], [torch.relu(torch.randn(8, k)) for _ in range(4)])
        q = quantize_layers(copy.deepcopy(fp32), acts)
        with torch.no_grad():
            ref32, ref8 = fp32(x), q(x)
        err = float((ref8 - ref32).abs().max() / ref32.abs().max())
        row = {"shape": f"{k}->{n}", "int8_rel_err": err}
        for form in forms:
            if form == "fp32":
                mod, ref = to_relax(fp32, x), ref32
            else:
                mod, ref = lower_int8(to_relax(q, x), kind=form), ref8
            start = time.perf_counter()
            compiled = compilers[form].compile(mod)
            lat = run_and_time(compiled.executable, x, ref, settings, atol=1e-4, rtol=1e-4)
            row[form] = lat.median_ms
            print(f"  {k}->{n} {form:5s}: {lat.median_ms:8.4f} ms (p25 {lat.p25_ms:.4f}, "
                  f"p75 {lat.p75_ms:.4f}) kernels {compiled.tuned}/{compiled.tasks} tuned, "
                  f"tuning {compiled.tuning_s:.0f} s, compile+time "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row)

    print()
    head = f"{'Linear (batch 1)':>18} {'fp32 ms':>9} {'int8 plain':>11} {'ratio':>6}"
    if "vnni" in forms:
        head += f" {'int8 vnni':>10} {'ratio':>6}"
    print(head + f" {'int8 rel err':>13}")
    for r in rows:
        line = (f"{r['shape']:>18} {r['fp32']:9.4f} {r['plain']:11.4f} "
                f"{r['fp32'] / r['plain']:6.2f}")
        if "vnni" in forms:
            line += f" {r['vnni']:10.4f} {r['fp32'] / r['vnni']:6.2f}"
        print(line + f" {r['int8_rel_err']:13.2e}")


if __name__ == "__main__":
    main()
