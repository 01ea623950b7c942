"""The vLLM engine processes distill starts: they die with distill, and their death is one line.

A `vllm.LLM` (a teacher, or the student's sampler) runs its EngineCore in a child process, and a
served teacher's api_server starts one of its own. Killed without a chance to clean up (SIGTERM's
default action, SIGKILL, the kernel's OOM killer), distill used to leave them running as orphans
holding ~10 GiB each. `EngineGuard` prevents that and reports deaths:

  watchdog  a small process, started after the engine, that polls its parent (distill); when the
            parent is gone, however it died, it terminates the engine's whole process tree
            (SIGTERM, then SIGKILL after a grace period). A parent-death signal (prctl) would only
            reach the engine's direct child of distill, not the processes it started;
  memory    a daemon thread samples the RSS of every engine process (peak and last), so a death
            can say how much the process held, and a benchmark can read the peaks;
  deaths    when one engine process dies the guard stops the rest of its tree (a surviving
            worker would leave vLLM's client waiting forever); `calls(...)` then turns the
            error raised (vLLM's EngineDeadError) into `EngineDied`: one `error:` line naming
            the process, its pid and its memory, with the fix (rerun: the run resumes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import psutil

from students.presets import StudentError

GIB = 1024**3
POLL_S = 0.5  # RSS sampling period of the guard thread
GRACE_S = 5.0  # SIGTERM -> SIGKILL

# Run as `python -c WATCHDOG PARENT_PID ROOT_PID...`: waits for the parent to go, kills the trees.
WATCHDOG = r"""
import os, sys, time
import psutil
parent = int(sys.argv[1])
roots = []
for a in sys.argv[2:]:
    try:
        roots.append(psutil.Process(int(a)))  # remembers its start time: no pid-reuse kills
    except psutil.Error:
        pass
def running(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while os.getppid() == parent:
    if not any(running(p) for p in roots):
        sys.exit(0)  # the engine stopped first: nothing to guard
    time.sleep(0.2)
procs = []
for p in roots:
    try:
        procs += [p, *p.children(recursive=True)]
    except psutil.Error:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs, timeout=float(os.environ.get("DISTILL_GUARD_GRACE", "5")))
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


class EngineDied(StudentError):
    """An engine process distill started is gone; the message names it and its memory."""


@dataclass
class Seen:
    """What the guard last saw of one engine process."""

    name: str
    proc: psutil.Process
    peak_rss: int = 0
    last_rss: int = 0
    alive: bool = True
    vital: bool = True  # its end is the engine's death (see `sample`)


@dataclass
class EngineGuard:
    """Watches the processes of one engine (`roots` and everything they start)."""

    label: str  # "vLLM teacher engine", "vLLM student sampler"
    roots: list[psutil.Process]
    seen: dict[int, Seen] = field(default_factory=dict)
    watchdog: subprocess.Popen[bytes] | None = None
    on_death: Callable[[], None] | None = None  # wakes a call blocked on the dead engine
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, label: str, pids: Sequence[int]) -> EngineGuard:
        """Guard the processes `pids` (and their descendants): watchdog and RSS sampling."""
        roots = []
        for pid in pids:
            with suppress(psutil.Error):
                roots.append(psutil.Process(pid))
        guard = cls(label=label, roots=roots)
        guard.sample()
        if roots:
            guard.watchdog = start_watchdog(pids)
        threading.Thread(target=guard._poll, name=f"guard:{label}", daemon=True).start()
        return guard

    @classmethod
    @contextmanager
    def around(cls, label: str) -> Iterator[list[EngineGuard]]:
        """Guard the child processes started inside the block: `with EngineGuard.around(...) as
        g: llm = LLM(...)`, then `g[0]` is the guard (none started: no processes to guard)."""
        before = {p.pid for p in psutil.Process().children()}
        out: list[EngineGuard] = []
        yield out
        new = [
            p.pid for p in psutil.Process().children() if p.pid not in before and _engine_process(p)
        ]
        out.append(cls.start(label, new))

    def processes(self) -> list[psutil.Process]:
        procs: list[psutil.Process] = []
        for root in self.roots:
            with suppress(psutil.Error):
                procs += [root, *root.children(recursive=True)]
        return procs

    def sample(self) -> None:
        """One look at every engine process: RSS (peak, last) and whether it still runs."""
        for p in self.processes():
            try:
                rss, name = p.memory_info().rss, p.name()
                zombie = p.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue
            s = self.seen.setdefault(p.pid, Seen(name=name, proc=p))
            s.last_rss = rss if not zombie else s.last_rss
            s.peak_rss = max(s.peak_rss, s.last_rss)
        roots = {r.pid for r in self.roots}
        for pid, s in self.seen.items():
            # Only the engine's own processes count: a root or a process vLLM titled (EngineCore,
            # Worker). Short-lived helpers under them (a compiler, a probe) come and go.
            s.vital = pid in roots or s.name.startswith("VLLM")
            s.alive = _running(pid, self.roots)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self.sample()
            if any(s.vital and not s.alive for s in self.seen.values()):
                self._kill_rest()
                if self.on_death is not None:
                    self.on_death()
                return

    def _kill_rest(self) -> None:
        """One engine process died: stop the others. A worker that outlives its EngineCore keeps
        the core's exit pipe open, so vLLM's client never notices the death and a call hangs;
        with the whole tree gone it raises EngineDeadError, which `calls` turns into one line."""
        for s in self.seen.values():
            if s.alive:
                with suppress(psutil.Error):
                    s.proc.kill()

    def peak_rss(self) -> dict[str, int]:
        """Peak RSS in bytes of each engine process seen, by 'name (pid)'."""
        return {f"{s.name} ({pid})": s.peak_rss for pid, s in self.seen.items()}

    def dead(self) -> str | None:
        """'NAME (pid N, X GiB at last look)' of an engine process that stopped, else None."""
        self.sample()
        for pid, s in self.seen.items():
            if s.vital and not s.alive:
                return f"{s.name} (pid {pid}, {s.last_rss / GIB:.1f} GiB at last look)"
        return None

    @contextmanager
    def calls(self) -> Iterator[None]:
        """Around calls into the engine: an error raised while one of its processes is dead
        becomes one EngineDied line (which process, how much memory, what to do)."""
        try:
            yield
        except Exception as e:
            gone = self.dead()
            if gone is None:
                raise
            raise EngineDied(
                f"the {self.label} process {gone} died ({type(e).__name__}), often the kernel's "
                "OOM killer: free memory (--dtype/--teacher-dtype bfloat16, --lora-rank, "
                "--gradient-checkpointing, fewer processes on the machine) and rerun the same "
                "command; it resumes from its last checkpoint"
            ) from None

    def close(self) -> None:
        """Stop sampling and the watchdog (after the engine was shut down normally)."""
        self._stop.set()
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.terminate()
            self.watchdog.wait()


def wake_blocked_call(llm: object) -> None:
    """Make a `vllm.LLM` call that waits on a dead engine raise EngineDeadError.

    vLLM 0.32's sync client notices the death and shuts down, but its output thread then exits
    without a word, and a call already waiting on the output queue waits forever: give it the
    error it would have raised.
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    queue = getattr(client, "outputs_queue", None)
    put = getattr(queue, "put_nowait", None)
    if put is not None:
        put(EngineDeadError())


def start_watchdog(pids: Sequence[int]) -> subprocess.Popen[bytes]:
    """A process that terminates the trees of `pids` once this process is gone (see WATCHDOG)."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to distill's group must not stop it first
        env={**os.environ, "DISTILL_GUARD_GRACE": str(GRACE_S)},
    )


def _engine_process(p: psutil.Process) -> bool:
    """A process vLLM started (its EngineCore titles itself `VLLM::EngineCore`), not another
    child that happened to start during the block: multiprocessing's resource tracker or
    forkserver, a short-lived helper. Guarding those would read their normal exit as the engine's
    death and stop a healthy engine."""
    try:
        name, cmdline = p.name(), " ".join(p.cmdline())
    except psutil.Error:
        return False
    if "multiprocessing.resource_tracker" in cmdline or "multiprocessing.forkserver" in cmdline:
        return False
    return name.startswith("VLLM") or "vllm" in cmdline.lower()


def _running(pid: int, roots: list[psutil.Process]) -> bool:
    for root in roots:
        if root.pid == pid:
            try:
                return root.is_running() and root.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """The pids among `pids` still running after up to `timeout_s` seconds (tests, scripts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [
            p
            for p in pids
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
