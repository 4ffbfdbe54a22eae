"""Parallel workers on one study: local processes on SQLite, 4 workers on a real PostgreSQL
server (Debian's package, started and stopped here), two "hosts" sharing only PostgreSQL and
an artifact store (a worker killed -9 there: its trial retried), one accuracy per policy
whichever worker runs it, and bad storage / artifact store / full disk as one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from search.core.errors import UserError
from search.jobs.run import check_out_dir
from search.study.points import DUPLICATE_OF
from tests.conftest import cli_env

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TINY = {"task": "tests.tasks:tiny", "finetune_steps": 5, "tune_trials_per_task": 0,
        "startup_trials": 2, "sensitivity": False}


def write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def search_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def check_no_trial_lost_or_duplicated(study: optuna.Study, run_dir: Path, trials: int) -> None:
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.RUNNING] == 0
    assert states[optuna.trial.TrialState.COMPLETE] >= trials
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # one number per trial, no gaps
    seeds = [t for t in study.trials if t.system_attrs.get("fixed_params")]
    assert len(seeds) == len({json.dumps(t.params, sort_keys=True) for t in seeds})
    for t in study.trials:  # every trial's files were written by the worker that ran it
        if t.state == optuna.trial.TrialState.COMPLETE:
            result = json.loads((run_dir / "trials" / f"{t.number:04d}" / "result.json")
                                .read_text())
            if DUPLICATE_OF in t.user_attrs:  # a policy proposed again: the twin's figures
                twin = t.user_attrs[DUPLICATE_OF]
                assert result == {DUPLICATE_OF: twin}
                assert t.user_attrs["latency_ms"] == study.trials[twin].user_attrs["latency_ms"]
                continue
            assert result["latency_ms"] == t.user_attrs["latency_ms"]


def test_two_local_workers_share_one_study(tmp_path):
    config = write_config(tmp_path / "c.yaml", trials=6)
    out = tmp_path / "run"
    result = search_cli("run", "--config", str(config), "--budget", "1ms", "--out", str(out),
                        "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    check_no_trial_lost_or_duplicated(study, out, 6)
    assert len(list((out / "worker-logs").glob("worker-*.log"))) == 2
    front = json.loads((out / "front.json").read_text())
    assert front["workers"] == 2 and front["points"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on a Unix socket (as `nobody` when run as root: initdb
    refuses root)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip("Debian's postgresql package is not installed (apt install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    root.chmod(0o777)
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    port = _free_port()
    data = root / "data"
    subprocess.run([*as_user, PG_BIN / "initdb", "-D", data, "-U", "search", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", data, "-l", root / "pg.log", "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses='' -c max_connections=60",
                    "start"], check=True, capture_output=True)
    try:
        subprocess.run([PG_BIN / "createdb", "-h", root, "-p", str(port), "-U", "search",
                        "search"], check=True, capture_output=True)
        yield f"postgresql://search@/search?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_four_workers_on_postgresql_lose_and_duplicate_no_trial(tmp_path, postgres):
    config = write_config(tmp_path / "c.yaml", trials=8)
    out = tmp_path / "run"
    result = search_cli("run", "--config", str(config), "--budget", "1ms", "--out", str(out),
                        "--workers", "4", "--storage", postgres, "--study", "pg-test")
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="pg-test", storage=postgres)
    check_no_trial_lost_or_duplicated(study, out, 8)
    assert study.user_attrs["run"]["storage"] == postgres  # a worker elsewhere can join
    assert not (out / "study.db").exists()  # the study lives in PostgreSQL only
    # another worker joining a finished study has nothing to do, and says so
    joined = search_cli("worker", "pg-test", "--storage", postgres, "--out", str(tmp_path / "w"))
    assert joined.returncode == 0 and "0 trials finished" in joined.stdout


def test_unreachable_storage_is_one_line_before_any_work(tmp_path):
    result = search_cli("run", "--out", str(tmp_path / "r"), "--storage",
                        f"postgresql://nobody@127.0.0.1:{_free_port()}/none", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open the study storage" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_disk_without_room_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="MiB free"):
        check_out_dir(tmp_path / "r", resume=False, min_free_bytes=1 << 62)


def test_one_policy_gets_one_accuracy_whichever_worker_runs_it(tmp_path):
    """Worker 0 and worker 3 (different sampler seeds) run one policy in two studies of one
    run seed: the same fine-tuned weights, the same accuracy. And the study alone (the policy
    in the trial's attrs) rebuilds the point, with no trial files."""
    import torch

    from search.study.points import POLICY, points_of
    from search.study.runfolder import trial_file

    config = write_config(tmp_path / "c.yaml", trials=1, finetune_steps=40)
    results = []
    for worker in (0, 3):
        out = tmp_path / f"run{worker}"
        made = search_cli("run", "--config", str(config), "--budget", "1ms", "--out", str(out))
        assert made.returncode == 0, made.stderr[-2000:]
        url = f"sqlite:///{out / 'study.db'}"
        study = optuna.load_study(study_name="search", storage=url)
        base = study.trials[0]
        params = {k: next((c for c in d.choices if c != base.params[k]), base.params[k])
                  for k, d in base.distributions.items()}  # every layer it can, compressed
        study.enqueue_trial(params)
        study.set_user_attr("run", {**study.user_attrs["run"],
                                    "config": {**study.user_attrs["run"]["config"],
                                               "trials": 2}})
        ran = search_cli("worker", "search", "--storage", url, "--out", str(out),
                         "--worker-id", str(worker))
        assert ran.returncode == 0, ran.stderr[-2000:]
        trial = optuna.load_study(study_name="search", storage=url).trials[1]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.params == params
        assert not (out / "trials" / "0001" / "model.pt").exists()  # kept in the store only
        weights = torch.load(trial_file(out, 1, "model.pt"), weights_only=True)
        results.append((trial, weights))
    (a, wa), (b, wb) = results
    assert a.user_attrs["val_accuracy"] == b.user_attrs["val_accuracy"]
    assert a.user_attrs["test_accuracy"] == b.user_attrs["test_accuracy"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/run3/study.db")
    points = points_of(study, 1.0, tmp_path / "no-such-folder")  # no trial files needed
    assert {p.trial for p in points} == {0, 1}
    assert next(p for p in points if p.trial == 1).policy == b.user_attrs[POLICY]


def test_the_driver_waits_for_a_trial_running_elsewhere(tmp_path):
    """A shared-storage run ends only when every claimed trial has finished: a trial another
    worker runs is waited for (settle), so the front written after it is whole."""
    import threading

    from search.study.config import SearchConfig
    from search.study.loop import settle
    from search.study.storage import open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s", 0, 1, create=True)
    elsewhere = study.ask()  # RUNNING, claimed by "another host"
    threading.Timer(1.5, lambda: study.tell(elsewhere, (0.5, 1.0, 10))).start()
    ran_here = []
    settle(study, SearchConfig(trials=1), again=lambda: ran_here.append(1), poll_s=0.1)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert not ran_here  # nothing was missing: only waited


def test_a_timing_on_this_cpu_holds_off_our_fine_tune_steps(tmp_path, monkeypatch):
    """While another process holds this CPU for a timing (device_lock), a fine-tune step
    (cpu_turn) waits; two target files for one CPU are one device."""
    from search.devices.lock import cpu_turn, physical_device
    from search.devices.target import load_target

    monkeypatch.setenv("SEARCH_LOCK_DIR", str(tmp_path / "locks"))
    host = load_target("host")
    other = tmp_path / "my-cpu.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(
        (Path(__file__).parent.parent / "targets" / "host.yaml").read_text()), "name": "my-cpu"}))
    assert physical_device(load_target(str(other))) == physical_device(host)
    held, released = tmp_path / "held", tmp_path / "released"
    code = ("import time, pathlib; from search.devices.lock import device_lock; "
            "from search.devices.target import load_target\n"
            f"with device_lock(load_target('host')):\n"
            f"    pathlib.Path({str(held)!r}).touch(); time.sleep(1.5)\n"
            f"    pathlib.Path({str(released)!r}).touch()\n")
    timing = subprocess.Popen([sys.executable, "-c", code], env={**cli_env(),
                              "SEARCH_LOCK_DIR": str(tmp_path / "locks")})
    deadline = time.time() + 60
    while not held.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert held.exists()
    with cpu_turn():
        assert released.exists()  # the step ran only after the timing let go
    timing.wait(timeout=60)


def host_env(root: Path) -> dict[str, str]:
    """A "host" on this machine: its own HOME and cache folder (trained task, tuning
    database); the lock folder stays machine-wide (one CPU)."""
    (root / "home").mkdir(parents=True, exist_ok=True)
    return {**cli_env(), "HOME": str(root / "home"), "SEARCH_CACHE_DIR": str(root / "cache")}


def on_host(env: dict[str, str], *args: str, timeout: float = 900
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_hosts_share_a_postgresql_study_and_an_artifact_store(tmp_path, postgres):
    """Host a runs the study (`search run --storage`), host b joins it (`search worker`); each
    has its own HOME, --out and cache folders, and they share only PostgreSQL and one artifact
    store. b is killed -9 mid-trial: no finished trial is lost, its trial runs again, and the
    run on a ends only when every claimed trial has finished. The front seen from either host
    lists every trial, and a trial that ran on one host exports on the other."""
    store = tmp_path / "shared-artifacts"
    env = {h: host_env(tmp_path / h) for h in ("a", "b")}
    config = write_config(tmp_path / "c.yaml", trials=1, finetune_steps=300, heartbeat_s=1,
                          heartbeat_grace_s=3)
    run_a = tmp_path / "a" / "run"
    made = subprocess.Popen([sys.executable, "-m", "search", "run", "--config", str(config),
                             "--budget", "1ms", "--out", str(run_a), "--storage", postgres,
                             "--study", "two", "--artifacts", str(store)], env=env["a"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert made.wait(timeout=900) == 0, made.stderr.read()[-2000:]  # the study, its baseline
    study = optuna.load_study(study_name="two", storage=postgres)
    study.set_user_attr("run", {**study.user_attrs["run"],  # (as `search run --resume
                                "config": {**study.user_attrs["run"]["config"],  # --trials 6`)
                                           "trials": 6}})
    worker_args = [sys.executable, "-m", "search", "worker", "two", "--storage", postgres,
                   "--out", str(tmp_path / "b" / "run")]
    doomed = subprocess.Popen(worker_args, env=env["b"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline, on_b = time.time() + 300, []
    while time.time() < deadline and not on_b and doomed.poll() is None:
        on_b = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                if t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")]
        time.sleep(0.2)
    assert on_b, f"host b never started a trial: {doomed.poll()} " + \
        (doomed.stderr.read()[-2000:] if doomed.poll() is not None else "")
    time.sleep(1)  # into its fine-tune
    doomed.kill()
    doomed.wait()
    # host a goes on with the run; host b's worker comes back
    driver = subprocess.Popen([sys.executable, "-m", "search", "run", "--out", str(run_a),
                               "--resume", "--trials", "6"], env=env["a"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    again = subprocess.Popen([*worker_args, "--worker-id", "1"], env=env["b"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert again.wait(timeout=900) == 0, again.stderr.read()[-2000:]
    assert driver.wait(timeout=900) == 0, driver.stderr.read()[-2000:]

    study = optuna.load_study(study_name="two", storage=postgres)
    dead = study.trials[on_b[0].number]
    assert dead.state == optuna.trial.TrialState.FAIL and "fail_reason" not in dead.user_attrs
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    ran = {t.number: int(t.user_attrs["worker"].rpartition(":")[2]) for t in done}
    ran_on_a = {n for n, pid in ran.items() if pid in (made.pid, driver.pid)}
    ran_on_b = {n for n, pid in ran.items() if pid == again.pid}
    assert ran_on_a | ran_on_b == set(ran) and ran_on_b
    listed = {t.number for t in done if DUPLICATE_OF not in t.user_attrs}

    fronts = {}
    for host in ("a", "b"):
        folder = tmp_path / host / "front"
        seen = on_host(env[host], "front", "--storage", postgres, "--study", "two",
                       str(folder), "--json")
        assert seen.returncode == 0, seen.stderr[-2000:]
        data = json.loads(seen.stdout)
        assert data["trials"]["complete"] == len(listed)  # every host's trials
        assert dead.number in {f["trial"] for f in data["trials"]["failed"]}
        fronts[host] = (folder, data)
    assert fronts["a"][1]["points"] == fronts["b"][1]["points"]
    on_front = {p["trial"] for p in fronts["a"][1]["points"]}
    base = fronts["a"][1]["baseline"]["trial"]
    for here, other in (("a", ran_on_b), ("b", ran_on_a)):
        pick = sorted((on_front & other) - {base})
        if not pick:
            continue
        folder = fronts[here][0]
        assert not (folder / "trials" / f"{pick[0]:04d}" / "model.pt").exists()
        out = on_host(env[here], "export", str(folder), str(pick[0]), "--out",
                      str(tmp_path / here / "export"))
        assert out.returncode == 0, out.stderr[-2000:]
        assert (tmp_path / here / "export" / "model.onnx").stat().st_size > 0
        assert list((tmp_path / here / "export").glob("model_*.so"))
        shown = on_host(env[here], "show", str(folder), str(pick[0]))  # its layers, knobs
        assert shown.returncode == 0 and f"trial {pick[0]}" in shown.stdout, shown.stderr
    assert any(sorted((on_front & other) - {base}) for other in (ran_on_a, ran_on_b))


def test_a_bad_artifact_store_or_half_a_shared_study_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [(["run", "--out", str(tmp_path / "r"), "--artifacts", str(blocker / "store")],
              "cannot write the artifact store"),
             (["run", "--out", str(tmp_path / "s"), "--artifacts", "s3://bucket/prefix"],
              "an S3 store is a whole bucket"),
             (["front", "--study", "nightly"], "needs both --storage URL and --study NAME"),
             (["front"], "name a run folder")]
    for args, words in cases:
        result = search_cli(*args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
    assert not (tmp_path / "r" / "run.yaml").exists()  # refused before anything was written


def test_a_trial_created_past_the_budget_gives_itself_up(tmp_path, monkeypatch):
    """Hosts check the budget (claimed_count) and then create a trial, so two may go ahead at
    once. The trial that the storage numbered past the budget is recorded as surplus (FAIL,
    nothing evaluated), counted nowhere, listed as no failure, and the run ends whole."""
    import search.study.loop as loop
    from search import search
    from search.study.storage import SURPLUS, finished_count, over_budget

    # the storage's order decides, whatever each host read before creating its trial
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    first, second, third = study.ask(), study.ask(), study.ask()  # three hosts, budget 2
    assert not over_budget(study, first.number, 2) and not over_budget(study, second.number, 2)
    assert over_budget(study, third.number, 2)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # lost with its worker: retried
    assert not over_budget(study, third.number, 2)

    real, lied = loop.claimed_count, []

    def stale(study: optuna.Study) -> int:  # one read taken before another host's claim
        n = real(study)
        if n >= 3 and not lied:
            lied.append(n)
            return n - 1
        return n

    monkeypatch.setattr(loop, "claimed_count", stale)
    front = search("tests.tasks:tiny", budget="1ms", trials=3, out=tmp_path / "run",
                   finetune_steps=5, tune_trials_per_task=0, startup_trials=2,
                   sensitivity=False, progress=False)
    assert lied  # the stale read happened, so a fourth trial was created
    made = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    surplus = [t for t in made.trials if t.user_attrs.get("fail_reason", "").startswith(SURPLUS)]
    assert len(surplus) == 1 and surplus[0].number == 3 and not surplus[0].params
    assert surplus[0].state == optuna.trial.TrialState.FAIL
    assert finished_count(made) == 3
    assert not (tmp_path / "run" / "trials" / "0003").exists()  # nothing was evaluated
    listed = json.loads((tmp_path / "run" / "front.json").read_text())["trials"]
    assert listed["failed"] == [] and front.points


def test_two_local_workers_cannot_both_take_one_waiting_trial(tmp_path, monkeypatch):
    """On SQLite, Optuna's read-then-write hand-over of a waiting (seed) trial is serialized
    (BEGIN IMMEDIATE): of two workers that read it at the same moment, one gets it and the
    other is told it is taken. Without it both ran the same trial (optuna/optuna#4002)."""
    import threading
    import time

    from optuna.storages._rdb import models

    from search.study.storage import open_storage, open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s", 0, 1, create=True)
    study.enqueue_trial({})
    trial_id = study.trials[0]._trial_id
    read = models.TrialModel.find_or_raise_by_id

    def slow_read(*args, **kwargs):  # both workers read the state before either writes
        found = read(*args, **kwargs)
        time.sleep(0.5)
        return found

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", staticmethod(slow_read))
    storages = [open_storage(url), open_storage(url)]
    got: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: got.append(
        s.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)))
        for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [False, True]
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_a_study_one_process_runs_reads_its_trials_once_a_trial_and_proposes_the_same(
        tmp_path):
    """TPE's constant liar (for studies other processes share) reads the storage once per
    parameter; a study only this process runs proposes the same without it, reading once."""
    from search.study.storage import open_study

    proposals, reads = {}, {}
    for shared in (True, False):
        study = open_study(f"sqlite:///{tmp_path}/{shared}.db", "s", 0, 2, create=True,
                           shared=shared)
        storage, count = study._storage, []
        get_all = storage.get_all_trials
        storage.get_all_trials = \
            lambda *a, count=count, get_all=get_all, **k: count.append(1) or get_all(*a, **k)
        drawn: list[list[int]] = []

        def objective(trial, drawn=drawn):
            xs = [trial.suggest_categorical(f"k{i}", [0, 1, 2]) for i in range(20)]
            drawn.append(xs)
            return sum(xs) / 40, 1.0 + xs[0], 100.0 + xs[1]

        for _ in range(5):
            count.clear()
            study.optimize(objective, n_trials=1)
        proposals[shared], reads[shared] = drawn, len(count)  # (reads: in the last trial)
    assert proposals[True] == proposals[False]
    assert reads[False] <= 3 and reads[True] >= 20
