"""Timing through TVM RPC on loopback: a plain server, a tracker with two servers, a drop."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from search.backend.compile import Compiler, to_relax
from search.backend.measure import run_and_time
from search.core.errors import TrialFailed
from search.devices.device import Device
from search.devices.target import Measurement, load_target
from tests.conftest import cli_env
from tests.rpc_helpers import kill, rpc_server, rpc_tracker, wait_key


@pytest.fixture(scope="module")
def compiled(tiny_task, tmp_path_factory):
    compiler = Compiler(load_target("host"), tmp_path_factory.mktemp("db"), trials_per_task=0)
    with torch.no_grad():
        ref = tiny_task.model(*tiny_task.example)
    return compiler.compile(to_relax(tiny_task.model, tiny_task.example)).executable, ref


def test_host_through_a_plain_rpc_server(tiny_task, compiled):
    executable, ref = compiled
    with rpc_server() as (port, _):
        lat = run_and_time(executable, tiny_task.example, ref, Measurement(2, 3, 5),
                           Device(rpc=f"127.0.0.1:{port}"))
    assert lat.median_ms > 0 and lat.emulated_by is None


def test_a_wrong_output_on_the_device_fails_the_trial(tiny_task, compiled):
    executable, _ = compiled
    with rpc_server() as (port, _), pytest.raises(TrialFailed, match="differs from PyTorch"):
        run_and_time(executable, tiny_task.example, torch.zeros(1, 10), Measurement(1, 1, 1),
                     Device(rpc=f"127.0.0.1:{port}"))


def test_a_device_that_drops_fails_the_trial_with_its_reason(tiny_task, compiled):
    executable, ref = compiled
    with rpc_server() as (port, proc):
        device = Device(rpc=f"127.0.0.1:{port}")
        kill(proc)
        with pytest.raises(TrialFailed, match="failed twice"):
            run_and_time(executable, tiny_task.example, ref, Measurement(1, 1, 1), device)


def test_a_tracker_with_two_servers_under_one_key(tiny_task, compiled):
    executable, ref = compiled
    with rpc_tracker() as tracker, rpc_server(tracker, "pool"), rpc_server(tracker, "pool"):
        wait_key(tracker, "pool", 2)
        device = Device(tracker=tracker, key="pool")
        device.check_reachable("host")
        # two sessions at once: the tracker hands out both devices of the pool
        a, b = device.session(), device.session()
        assert a is not b
        del a, b  # sessions end when dropped; the tracker frees both devices
        gc.collect()
        lat = run_and_time(executable, tiny_task.example, ref, Measurement(2, 3, 5), device)
        assert lat.median_ms > 0


@pytest.mark.slow
def test_search_run_through_a_tracker_tunes_and_times_on_the_pool(tmp_path):
    """The whole path: MetaSchedule's RPC runner tunes on the pool, trials time on it."""
    config = tmp_path / "c.yaml"
    config.write_text("task: tests.tasks:tiny\ntrials: 2\nfinetune_steps: 2\n"
                      "tune_trials_per_task: 2\nseeds: [{}, {rank: 0.25}]\n")
    with rpc_tracker() as tracker, rpc_server(tracker, "pool"), rpc_server(tracker, "pool"):
        wait_key(tracker, "pool", 2)
        out = tmp_path / "r"
        result = subprocess.run(
            [sys.executable, "-m", "search", "run", "--config", str(config), "--budget", "5ms",
             "--tracker", tracker, "--key", "pool", "--out", str(out)],
            env={**cli_env(), "SEARCH_CACHE_DIR": str(tmp_path / "cache")},
            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    front = json.loads((out / "front.json").read_text())
    assert front["trials"]["complete"] == 2 and not front["emulated"]
    assert all(p["latency_source"] == {"method": "measured", "target": "host",
                                       "tuning": "tuned", "emulator": None,
                                       "reference_ms": None}  # its own fastest round
               for p in front["points"])


def test_no_device_is_a_one_line_error_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "search", "run", "--target", "raspberry-pi", "--out",
         str(tmp_path / "r")], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "raspberrypi.local:9090" in line and "tvm.exec.rpc_server" in line
    assert not (tmp_path / "r").exists()  # nothing was started
