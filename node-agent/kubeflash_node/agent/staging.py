"""Runs stage workers, one at a time, on a thread of the agent; reports their progress and results.

Each model is staged by a child process (stageworker) into `models/.staging-<id>-<suffix>/` and renamed into
`models/<id>` only when converted and verified, so nothing half-written is ever under a model's name. The
child is killed with the agent (PR_SET_PDEATHSIG) and when its model stops being wanted; the staging
directory is always removed afterwards, and on the next start if the agent itself was killed: it is
locked (store.scratch) while its stager lives, so the cleanup never touches a live one.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kubeflash_node.store.fetch import redact
from kubeflash_node.store.format import fsync_dir
from kubeflash_node.store.scratch import STAGING, Scratch

from .config import ModelWant
from .devices import Disk
from .fsutil import trash
from .paths import Source, model_dir, models_dir
from .stageworker import EXIT_STOPPED

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One model to stage on one disk; percent and phase are updated while it runs."""

    id: str
    want: ModelWant
    source: Source
    disk: Disk
    evict_only_unwanted: bool = False  # a model that was itself evicted may not push wanted ones out
    percent: float = 0.0
    phase: str = "queued"
    running: bool = False
    cancelled: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)


NeedFn = Callable[[Task, int, str], tuple[bool, str]]  # (go?, message if not)
DoneFn = Callable[[Task, int], None]  # bytes staged
FailFn = Callable[[Task, str, str], None]  # kind, message


class Stager:
    def __init__(self, *, on_need: NeedFn, on_done: DoneFn, on_fail: FailFn, python: str = "",
                 http: dict | None = None):
        self.on_need, self.on_done, self.on_fail = on_need, on_done, on_fail
        self.http = http or {}  # config.http_policy(): what the worker may download
        self.python = python or sys.executable
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="stager", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            for t in self._tasks.values():
                self._cancel(t)
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, task: Task) -> None:
        with self._lock:
            self._tasks[task.id] = task
        self._queue.put(task)

    def cancel(self, model_id: str) -> None:
        with self._lock:
            if (t := self._tasks.get(model_id)) is not None:
                self._cancel(t)

    def _cancel(self, t: Task) -> None:
        t.cancelled = True
        if t.proc is not None and t.proc.poll() is None:
            t.proc.kill()

    def tasks(self) -> dict[str, Task]:
        with self._lock:
            return dict(self._tasks)

    def idle(self) -> bool:
        with self._lock:
            return not self._tasks

    # ------------------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                if not task.cancelled:
                    self._run(task)
            except Exception as e:  # keep the stager alive whatever one model does
                log.exception("staging crashed", extra={"model": task.id})
                self.on_fail(task, "internal", f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._tasks.pop(task.id, None)

    def _run(self, task: Task) -> None:
        root = models_dir(task.disk.path)
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        with Scratch(root, f"{STAGING}{task.id}-") as scratch:  # locked while we live; removed afterwards
            self._stage(task, scratch.path)

    def _stage(self, task: Task, staging: Path) -> None:
        req = {"kind": task.source.kind, "ref": task.source.ref, "fetchName": task.source.fetch_name,
               "sha256": task.source.sha256, "staging": str(staging), "id": task.id, "dtype": task.want.dtype,
               "quantization": task.want.quantization, "http": self.http, "sparsity": list(task.want.sparsity)}
        task.running, task.phase = True, "start"
        log.info("staging model", extra={"model": task.id, "uri": redact(task.want.uri), "disk": task.disk.name})
        proc = subprocess.Popen([self.python, "-m", "kubeflash_node.agent.stageworker", json.dumps(req)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_die_with_parent)
        task.proc = proc
        if task.cancelled:  # cancelled between the check and the start
            proc.kill()
        err_tail: collections.deque[str] = collections.deque(maxlen=40)
        reader = threading.Thread(target=lambda: err_tail.extend(proc.stderr), daemon=True)
        reader.start()
        done, error, refused = None, None, None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "need":
                ok, msg = self.on_need(task, int(ev.get("bytes", 0)), str(ev.get("phase", "")))
                refused = None if ok else msg
                _answer(proc, "go" if ok else "stop")
            elif kind == "progress":
                task.percent, task.phase = float(ev.get("percent", 0.0)), str(ev.get("phase", ""))
            elif kind == "done":
                done = int(ev.get("bytes", 0))
            elif kind == "error":
                error = (str(ev.get("kind", "internal")), str(ev.get("message", "")))
        rc = proc.wait()
        reader.join(timeout=5)
        if task.cancelled:
            log.info("staging cancelled", extra={"model": task.id})
        elif done is not None and rc == 0:
            self._publish(task, staging)
            self.on_done(task, done)
        elif refused is not None and rc == EXIT_STOPPED:
            self.on_fail(task, "nofit", refused)
        elif error is not None:
            log.warning("staging failed", extra={"model": task.id, "kind": error[0], "error": error[1],
                                                  "stderr": "".join(err_tail)[-2000:]})
            self.on_fail(task, *error)
        else:
            how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
            tail = "".join(err_tail).strip().splitlines()[-1:] or [""]
            self.on_fail(task, "internal", f"staging worker died ({how}) {tail[0]}".strip())

    def _publish(self, task: Task, staging: Path) -> None:
        final = model_dir(task.disk.path, task.id)
        trash(final)  # a leftover of the same id (adopted but unreadable): replaced
        os.replace(staging / task.id, final)
        fsync_dir(final.parent)
        log.info("model ready", extra={"model": task.id, "disk": task.disk.name, "path": str(final)})


def _answer(proc: subprocess.Popen, word: str) -> None:
    try:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
