"""The runner on a shared server (issue 16): a confined runner refuses jobs outside the roots and pickle
checkpoints at once (not retried); a database outage or a concurrent schema creation releases the job without
failing it; a stopped runner gives its job back; temporary dataset copies live under the cache directory and go on
every exit path (a killed runner's at the next start); SIGTERM to a runner with Ray started exits 0 mid-search and
releases the job."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from quantplan.errors import QuantPlanError
from quantplan.service.runner import JobRun, Runner, RunnerConfig
from quantplan.service.scratch import datasets_scratch
from quantplan.storage import DatabaseUnavailableError, Repository, load_settings, open_store, transient
from tests.service.test_cli import wait_for
from tests.service.test_runner import _trials

SPEC = {"model": "m", "data": "wikitext2", "budget_bits": 4.25}


def _runner(tmp_path: Path, **config: object) -> tuple[Repository, Runner]:
    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", artifacts=str(tmp_path / "art"),
                             model_roots=str(models), data_roots=str(data))
    repo = Repository(settings=settings)
    runner = Runner(repo, open_store(tmp_path / "art"), config=RunnerConfig(heartbeat_interval=0.2, **config))
    return repo, runner


def _not_loaded(self, progress):
    raise AssertionError("the job was loaded")


def test_a_confined_runner_fails_jobs_outside_the_roots_and_pickles_at_once(tmp_path, monkeypatch) -> None:
    repo, runner = _runner(tmp_path, confined=True, max_attempts=3)
    monkeypatch.setattr("quantplan.service.runner.JobRun._load", _not_loaded)
    (tmp_path / "data" / "train.txt").write_text("some text\n")
    pickled = tmp_path / "models" / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    data = f"text:{tmp_path / 'data' / 'train.txt'}"
    outside = repo.create_job({**SPEC, "model": str(pickled), "data": "text:/etc/passwd"})  # e.g. stored by hand
    pickle_job = repo.create_job({**SPEC, "model": str(pickled), "data": data})
    hub = repo.create_job({**SPEC, "model": "org/model", "data": data})
    for job, message in ((outside, "outside the data roots"), (pickle_job, "safetensors"),
                         (hub, "QUANTPLAN_ALLOW_HUB")):
        done = runner.run_job(job.id)
        assert (done.status, done.attempts) == ("failed", 1), done
        assert message in done.error


def test_local_mode_is_not_confined(tmp_path, monkeypatch) -> None:
    repo, runner = _runner(tmp_path)  # `quantplan run`: the default config
    seen = []
    monkeypatch.setattr("quantplan.service.runner.JobRun._load",
                        lambda self, progress: seen.append(self.spec.data) or _not_loaded(self, progress))
    job = repo.create_job({**SPEC, "model": "/anywhere/model", "data": "text:/etc/hostname"})
    runner.run_job(job.id)
    assert seen == ["text:/etc/hostname"]


@pytest.mark.parametrize("error", [
    DatabaseUnavailableError("database is unreachable"),
    OperationalError("SELECT 1", {}, Exception("connection refused")),
    IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: alembic_version.version_num")),
])
def test_database_errors_release_the_job_without_failing_it(tmp_path, monkeypatch, error) -> None:
    repo, runner = _runner(tmp_path, max_attempts=1)
    job = repo.create_job(SPEC)

    def outage(self, progress):
        raise QuantPlanError("could not open the study") from error  # as the search wraps it

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", outage)
    done = runner.run_once()
    assert (done.id, done.status, done.attempts) == (job.id, "queued", 1)  # max_attempts=1, and still queued
    assert "retried" in done.error and "connection refused" not in done.error
    assert transient(error) and not transient(QuantPlanError("bad input"))
    assert not transient(OperationalError("connect", {}, Exception("unable to open database file")))


def test_a_pickle_checkpoint_torch_refuses_fails_the_job_at_once(tmp_path, monkeypatch) -> None:
    repo, runner = _runner(tmp_path, max_attempts=3)  # local mode: not confined, so the loader meets the pickle
    job = repo.create_job(SPEC)

    def refused(self, progress):
        try:
            raise pickle.UnpicklingError("Weights only load failed")
        except pickle.UnpicklingError as e:
            raise OSError("Unable to load weights from pytorch checkpoint file") from e

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", refused)
    done = runner.run_once()
    assert (done.id, done.status, done.attempts) == (job.id, "failed", 1)
    assert "pickle" in done.error and "safetensors" in done.error


def test_database_text_stays_in_the_log(tmp_path, monkeypatch) -> None:
    repo, runner = _runner(tmp_path, max_attempts=1)
    job = repo.create_job(SPEC)
    secret = "postgresql://admin@db.internal:5432/prod: permission denied for schema public"

    def refused(self, progress):
        raise QuantPlanError(f"cannot open the study database {secret}") from IntegrityError("CREATE", {},
                                                                                             Exception(secret))

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", refused)
    done = runner.run_once()
    assert (done.id, done.status) == (job.id, "failed")
    assert "reference" in done.error and "db.internal" not in done.error


def test_a_full_or_unwritable_disk_is_one_error_line(capsys, monkeypatch) -> None:
    from quantplan.service import cli

    def full(**_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/.tmp-plan")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["materialize"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "/data/artifacts/.tmp-plan" in err and "Traceback" not in err


def test_a_stopping_runner_gives_the_job_back(tmp_path, monkeypatch) -> None:
    repo, runner = _runner(tmp_path, max_attempts=1)
    job = repo.create_job(SPEC)

    def load(self, progress):
        runner.stopping.set()  # SIGTERM arrives while the model loads

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", load)
    monkeypatch.setattr("quantplan.service.runner.JobRun._sensitivity", _not_loaded)
    done = runner.run_job(job.id)
    assert (done.status, done.stage) == ("queued", "load") and "stopped" in done.error


def test_dataset_copies_live_under_the_cache_and_go_on_every_exit(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("QUANTPLAN_DATASETS_CACHE", raising=False)
    parent = tmp_path / "cache" / "datasets-tmp"
    killed = parent / f"{socket.gethostname()}-{_dead_pid()}-abc"  # left by a runner killed with SIGKILL
    other_host = parent / "elsewhere-1-abc"
    for path in (killed, other_host):
        (path / "copy").mkdir(parents=True)
    with pytest.raises(RuntimeError), datasets_scratch(tmp_path / "cache") as path:
        assert path is not None and path.parent == parent
        assert os.environ["QUANTPLAN_DATASETS_CACHE"] == str(path)
        assert not killed.exists() and other_host.exists()  # only this host's dead runners' copies go
        path.mkdir()  # as the datasets library does for its first copy
        (path / "copy.arrow").write_bytes(b"x")
        raise RuntimeError("the job crashed")
    assert not path.exists() and "QUANTPLAN_DATASETS_CACHE" not in os.environ
    monkeypatch.setenv("QUANTPLAN_DATASETS_CACHE", str(tmp_path / "mine"))
    with datasets_scratch(tmp_path / "cache") as path:
        assert path is None  # the user's setting wins


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_sigterm_mid_search_with_ray_exits_0_and_releases_the_job(tmp_path, stories_hf, stories_dir,
                                                                   ray_address) -> None:
    db, cache = f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "cache"
    repo = Repository(db)
    job = repo.create_job({"model": str(stories_hf), "data": f"text:{stories_dir / 'sampled_seed1.txt'}",
                           "budget_bits": 4.25, "trials": 100_000, "samples": 12, "seq_len": 64, "eval_samples": 8,
                           "eval_top": 1})
    env = {**os.environ, "QUANTPLAN_DATABASE_URL": db, "QUANTPLAN_ARTIFACTS": str(tmp_path / "art"),
           "QUANTPLAN_CACHE_DIR": str(cache), "QUANTPLAN_RAY_ADDRESS": ray_address}
    env.pop("QUANTPLAN_DATASETS_CACHE", None)
    proc = subprocess.Popen([sys.executable, "-m", "quantplan.service.cli", "runner", "--heartbeat", "0.5",
                             "--poll", "0.2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert wait_for(lambda: _trials(db, f"job-{job.id}") >= 5 or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert list((cache / "datasets-tmp").iterdir())  # the runner's copies are under the cache
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    released = repo.get_job(job.id)
    assert (released.status, released.stage, released.runner) == ("queued", "search", None)
    assert list((cache / "datasets-tmp").iterdir()) == []  # no temporary copies left


class _Proxy:
    """A TCP proxy to PostgreSQL that can be taken down (listener closed, every connection cut) and brought back
    on the same port: the database is unreachable in between, as in an outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.up()

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            server = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.mark.slow
def test_a_database_outage_as_the_search_starts_does_not_fail_the_job(tmp_path, stories_hf, stories_dir,
                                                                      pg_databases, ray_local, monkeypatch) -> None:
    url = make_url(pg_databases.create())
    proxy = _Proxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(port=proxy.port).render_as_string(hide_password=False)
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(tmp_path / "cache"))
    repo = Repository(through)
    runner = Runner(repo, open_store(tmp_path / "art"), config=RunnerConfig(heartbeat_interval=0.5, max_attempts=1))
    job = repo.create_job({"model": str(stories_hf), "data": f"text:{stories_dir / 'sampled_seed1.txt'}",
                           "budget_bits": 4.25, "trials": 30, "samples": 12, "seq_len": 64, "eval_samples": 8,
                           "eval_top": 1, "materialize_top": 0})
    search, outages = JobRun._search, []

    def search_in_an_outage(self, inputs, progress):
        if not outages:  # the database goes away for 10 s just as the study is opened
            proxy.down()
            outages.append(threading.Timer(10.0, proxy.up))
            outages[0].start()
        return search(self, inputs, progress)

    monkeypatch.setattr(JobRun, "_search", search_in_an_outage)
    ends = []
    while len(ends) < 3 and (not ends or ends[-1].status != "succeeded"):
        ends.append(runner.run_once())  # max_attempts=1: an outage that counted would fail the job
    outages[0].join()
    assert [e.id for e in ends] == [job.id] * len(ends)
    assert [e.status for e in ends][-1] == "succeeded" and "failed" not in [e.status for e in ends], ends
    assert repo.plans_for_job(job.id)
