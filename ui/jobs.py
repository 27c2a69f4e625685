"""Background jobs for the app: each job is one `studio` CLI command run in a worker process.

A job lives in its own folder under `<data>/jobs/<id>/`: `job.json` (what it runs and how it
went), `log.txt` (everything the command printed) and `out/` (what it wrote). The folder is
the job's whole state, so jobs survive a page reload and an app restart, and two jobs never
share a file. The app never trains or samples in its own process: it queues a command line
that a CLI user could type (`Job.command`), and a dispatcher thread starts at most `workers`
of them at a time.

Example:
    >>> queue = JobQueue("/tmp/studio-data", workers=1)  # doctest: +SKIP
    >>> job = queue.create("sample", "a red circle")  # doctest: +SKIP
    >>> queue.submit(job, ["sample", "a red circle", "--output-dir", str(job.out)])  # doctest: +SKIP
    >>> queue.wait(job.id).status  # doctest: +SKIP
    'done'
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.errors import StudioError

QUEUED, RUNNING, STOPPING, DONE, FAILED, STOPPED = "queued", "running", "stopping", "done", "failed", "stopped"
FINISHED = (DONE, FAILED, STOPPED)
PROGRESS_LINE = re.compile(r"(?P<desc>[^:|]*):\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)")  # a tqdm bar


@dataclass
class Job:
    """One queued command and what became of it (the content of `job.json`)."""

    id: str
    kind: str  # "train", "sample", ...: the studio sub-command
    title: str
    folder: str
    argv: list[str] = field(default_factory=list)  # after `studio`
    status: str = QUEUED
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    pid: int | None = None  # of the worker process while it runs
    message: str = ""  # the one line a failed command printed last, or why it stopped

    @property
    def out(self) -> Path:
        return Path(self.folder) / "out"

    @property
    def log(self) -> Path:
        return Path(self.folder) / "log.txt"

    @property
    def command(self) -> str:
        """The job as a shell command a CLI user can paste. It writes to a folder of its own,
        `outputs/<kind>/<job id>`, never into the job's folder in the app's data."""
        argv = list(self.argv)
        if "--output-dir" in argv:
            argv[argv.index("--output-dir") + 1] = f"outputs/{self.kind}/{self.id}"
        return shlex.join(["studio", *argv])

    def save(self) -> None:
        path = Path(self.folder) / "job.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(self), indent=2))
        partial.replace(path)  # a reader never sees half a file


class JobQueue:
    """Jobs on disk under `root/jobs`, run `workers` at a time by a dispatcher thread."""

    def __init__(self, root: str | Path, workers: int = 1, poll_seconds: float = 0.2) -> None:
        self.root = Path(root).resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.poll_seconds = poll_seconds
        self.lock = threading.Lock()
        self.processes: dict[str, subprocess.Popen] = {}
        self.jobs: dict[str, Job] = {}
        for path in sorted((self.root / "jobs").glob("*/job.json")):
            job = Job(**json.loads(path.read_text()))
            job.folder = str(path.parent)  # the data folder may have moved
            if job.status in (RUNNING, STOPPING):  # the app died while it ran (a clean exit stops its jobs)
                _stop_orphan(job.pid)
                job.status, job.message = STOPPED, "the app stopped while this job ran; resume it or start it again"
                job.save()
            self.jobs[job.id] = job
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="studio-jobs", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    # -- what the app calls -------------------------------------------------------------

    def create(self, kind: str, title: str) -> Job:
        """A new job with its folder (put its inputs there), not yet queued."""
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        folder = self.root / "jobs" / job_id
        (folder / "out").mkdir(parents=True)
        return Job(id=job_id, kind=kind, title=title, folder=str(folder), created=time.time())

    def submit(self, job: Job, argv: list[str]) -> Job:
        """Queue `studio <argv>` to run in `job`'s folder."""
        job.argv, job.status = list(argv), QUEUED
        job.save()
        with self.lock:
            self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise StudioError(f"no job {job_id!r}; pick one from the Jobs tab")
            return self.jobs[job_id]

    def list(self) -> list[Job]:
        """All jobs, newest first."""
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def ahead_of(self, job_id: str) -> int:
        """How many jobs will start or are running before this queued one (0 once it runs)."""
        job = self.get(job_id)
        if job.status != QUEUED:
            return 0
        with self.lock:
            return sum(1 for other in self.jobs.values()
                       if other.status in (RUNNING, STOPPING) or (other.status == QUEUED and other.created < job.created))

    def stop(self, job_id: str) -> Job:
        """Stop a job: a queued one is dropped, a running one gets SIGTERM (a training run saves a
        checkpoint at the end of its current step, then exits)."""
        job = self.get(job_id)
        with self.lock:
            if job.status == QUEUED:
                job.status, job.message = STOPPED, "stopped before it started"
                job.save()
            elif job.status == RUNNING:
                job.status = STOPPING
                job.save()
                self.processes[job.id].send_signal(signal.SIGTERM)
        return job

    def delete(self, job_id: str) -> None:
        """Forget a finished (or never started) job and delete its folder; a running job must be stopped first."""
        job = self.get(job_id)
        with self.lock:
            if job.status in (RUNNING, STOPPING):
                raise StudioError(f"job {job_id} is {job.status}; stop it first, then delete it")
            del self.jobs[job_id]
        shutil.rmtree(job.folder, ignore_errors=True)

    def resume(self, job_id: str, extra_argv: list[str]) -> Job:
        """Queue a stopped or failed job again with `extra_argv` added (e.g. `--resume latest`)."""
        job = self.get(job_id)
        if job.status not in (STOPPED, FAILED):
            raise StudioError(f"job {job_id} is {job.status}; only a stopped or failed job can be resumed")
        argv = list(job.argv)
        for i in range(0, len(extra_argv), 2):  # replace a flag given before rather than repeat it
            if extra_argv[i] in argv:
                del argv[argv.index(extra_argv[i]):argv.index(extra_argv[i]) + 2]
        job.returncode, job.message, job.started, job.ended = None, "", None, None
        return self.submit(job, argv + extra_argv)

    def wait(self, job_id: str, timeout: float = 3600.0) -> Job:
        """Block until the job has finished (or `timeout` seconds passed) and return it."""
        deadline = time.time() + timeout
        while self.get(job_id).status not in FINISHED and time.time() < deadline:
            time.sleep(self.poll_seconds)
        return self.get(job_id)

    def progress(self, job_id: str) -> tuple[str, int, int] | None:
        """The job's latest progress bar as (description, done, total), read from its log, or None.

        Example:
            >>> queue.progress(job.id)  # doctest: +SKIP
            ('sampling', 8, 16)
        """
        for line in reversed(_tail_lines(self.get(job_id).log, 4000)):
            match = PROGRESS_LINE.search(line)
            if match:
                return match["desc"].strip(), int(match["done"]), int(match["total"])
        return None

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        """The last `lines` lines of a job's output, with progress-bar redraws (\\r) as separate lines."""
        return "\n".join(_tail_lines(self.get(job_id).log, 200_000)[-lines:])

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop starting jobs and stop the running ones (SIGTERM: a training run checkpoints first),
        so none outlives the app and writes into a folder a later app would reuse. Runs at exit."""
        with self.lock:
            self._closed = True
            for job_id, process in self.processes.items():
                self.jobs[job_id].status = STOPPING
                process.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for process in list(self.processes.values()):
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
        with self.lock:
            self._reap()

    # -- the dispatcher -----------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            with self.lock:
                if self._closed:  # checked under the lock: shutdown() and a start never interleave
                    return
                self._reap()
                running = sum(1 for j in self.jobs.values() if j.status in (RUNNING, STOPPING))
                waiting = sorted((j for j in self.jobs.values() if j.status == QUEUED), key=lambda j: j.created)
                for job in waiting[: max(0, self.workers - running)]:
                    self._start(job)
            time.sleep(self.poll_seconds)

    def _start(self, job: Job) -> None:
        log = job.log.open("ab")
        log.write(f"$ {job.command}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.processes[job.id] = subprocess.Popen(
            [sys.executable, "-m", "studio.cli", *job.argv], cwd=job.folder, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,  # a Ctrl-C in the app's terminal is not theirs
        )
        log.close()
        job.status, job.started, job.pid = RUNNING, time.time(), self.processes[job.id].pid
        job.save()

    def _reap(self) -> None:
        for job_id, process in list(self.processes.items()):
            code = process.poll()
            if code is None:
                continue
            del self.processes[job_id]
            job = self.jobs[job_id]
            job.returncode, job.ended, job.pid = code, time.time(), None
            if code == 0:  # finished, even if a stop came too late
                job.status, job.message = DONE, ""
            elif job.status == STOPPING:
                job.status, job.message = STOPPED, self._stopped_message(job)
            else:
                job.status, job.message = FAILED, self._last_line(job).removeprefix("error: ") or f"exit status {code}"
            job.save()

    @staticmethod
    def _last_line(job: Job) -> str:
        lines = _tail_lines(job.log, 4000)
        return lines[-1].strip() if lines else ""

    def _stopped_message(self, job: Job) -> str:
        """A stopped training says where it stopped and that Resume continues; anything else, "stopped"
        (never the progress-bar line it was drawing when the stop came)."""
        found = STOPPED_AT.search(self._last_line(job))
        if found:
            return f"stopped at step {found[1]} of {found[2]} — Resume continues from there"
        return "stopped"


STOPPED_AT = re.compile(r"stopped at step (\d+) of (\d+)")  # the training loop's last line when stopped


def _stop_orphan(pid: int | None) -> None:
    """SIGTERM a worker left running by an app that died, if that pid is still one of our workers."""
    if not pid:
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone (or no /proc): nothing to stop
    if b"studio.cli" in command:
        os.kill(pid, signal.SIGTERM)


def _tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The non-empty lines in the last `max_bytes` of a log file; progress-bar redraws (\\r) split lines."""
    if not path.is_file():
        return []
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - max_bytes))
        text = file.read().decode("utf-8", errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()]
