"""Verifier guard: an input-size cap and a time limit on every verifier call.

Under RL the policy searches for whatever the reward pays for, and that includes answers on which
a verifier hangs or runs for minutes (math-verify and sympy on nested powers, huge numbers or
deep nesting). :class:`VerifierGuard` runs the verifier of one batch of ``(answer, example)``
pairs so that no answer can stall a step:

1. An answer longer than ``max_answer_chars`` is incorrect and the verifier is not called
   (``rewards/verifier_too_long``).
2. Every other answer is verified in a worker process with ``timeout_s`` per answer: a verdict
   that has not come back ``timeout_s`` after the previous one (or after the batch was sent)
   makes that answer incorrect (``rewards/verifier_timeouts``), the worker is killed and a fresh
   one takes the rest of the batch. A verifier that raises, or a worker that dies (segfault, OOM
   killer), makes that answer incorrect (``rewards/verifier_errors``). One batch therefore takes
   at most its normal verification time plus ``timeout_s`` and a fork per timed-out answer.
3. ``timeout_s=None`` verifies in this process: size cap, no time limit (platforms without
   ``fork``, debugging).

No ``eval`` of model text: in the worker, ``eval`` of a string that is not the example's own
data reads Python literals only and ``exec`` of one is refused (:func:`_guard_eval`; some
reasoning-gym tasks ``eval`` the answer). This is a guard against that pattern, not a sandbox:
a verifier library that compiles model text itself (sympy's ``parse_expr`` behind math-verify,
reached only for text math-verify's extraction regexes accept) is trusted as it stands.

Why a process, and why a fork: a Python thread cannot be killed, and ``signal.alarm`` works only
in the main thread and only between bytecodes (math-verify's own time limit uses it; one huge
``int`` power never returns to it), so the reliable limit is a process that can be killed. The
worker is a ``fork`` of this process made at first use: it already holds every verifier and
dataset object, closures included, so nothing has to be importable or picklable, and it stays up
between batches, keeping warm caches (math-verify's first call in a fresh process takes ~0.4 s,
later ones ~2 ms). A batch reaches it pickled: plain data (str, numbers, containers, frozen
dataclass records such as :class:`~calibrl.data.example.Example`) by value, every other object (the
verifier, a bound method, a reasoning-gym dataset) as a key into the table of objects the worker
inherited. A batch that needs an object made after the fork re-forks the worker first.

Choice and cost (measured on 2 shared CPU cores; ``tests/rewards/test_verifier_guard.py`` bounds it):
every verifier goes through the worker, ``exact`` and ``squad_em`` too. The round trip costs
~0.1 ms per answer (pickling the example, one 5-byte result back): 512 ``exact`` answers take
~45 ms through the worker against ~1 ms in-process, next to ~2-3 ms per answer of math-verify
itself and seconds of generation per step, so an in-process fast path for the bounded verifiers
would save little and add a second path to trust. A fork costs ~30 ms for a small process plus
~70 ms per GiB of its resident memory; it is paid at first use, after each timeout and when a
batch brings a non-plain object the worker does not hold (e.g. the eval set's dataset).

Memory: the worker shares this process's pages copy-on-write; pages this process rewrites later
are duplicated, so the worker's resident memory is bounded by this process's at the last fork.
It closes every inherited file descriptor but stdio and its two pipes (so it holds no sockets,
and a dead worker's pipe reports EOF), and exits when its parent does.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import math
import os
import pickle
import signal
import struct
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any

__all__ = ["COUNTERS", "DEFAULT_MAX_ANSWER_CHARS", "DEFAULT_TIMEOUT_S", "GuardedVerdicts", "VerifierGuard"]

log = logging.getLogger(__name__)

COUNTERS = ("rewards/verifier_timeouts", "rewards/verifier_too_long", "rewards/verifier_errors")
"""Metric keys of the per-batch counts (:attr:`GuardedVerdicts.counts`), logged every step."""

DEFAULT_TIMEOUT_S = 5.0
"""Default ``reward.verifier_timeout_s``: math-verify takes milliseconds on a normal answer."""

DEFAULT_MAX_ANSWER_CHARS = 8192
"""Default ``reward.max_answer_chars``: above any reference answer of the shipped data sets (the
longest reasoning-gym answers, move lists and grids, run to a few thousand characters)."""

_WRONG, _RIGHT, _ERROR = 0, 1, 2
_RESULT = struct.Struct("<IB")  # (index in the payload, status)
_BY_VALUE = frozenset({str, bytes, int, float, complex, bool, type(None), tuple, list, dict, set, frozenset})
_PARENT_POLL_S = 1.0  # an idle worker checks this often whether its parent is gone


@dataclass(frozen=True)
class GuardedVerdicts:
    """Verdicts of one batch.

    Attributes:
        correct: one verdict per ``(answer, example)`` pair, in order.
        counts: :data:`COUNTERS` -> number of answers of the batch in that case.
    """

    correct: list[bool]
    counts: dict[str, int]


class _Refs:
    """Objects sent to the worker by reference: key <-> object. Keys are never reused and the
    table holds each object, so ``id`` stays unique while it is in the table."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self._key_of: dict[Any, int] = {}
        self._next = itertools.count()
        self.used: set[int] = set()

    def key(self, obj: Any) -> int:
        ident = _identity(obj)
        k = self._key_of.get(ident)
        if k is None:
            k = next(self._next)
            self._key_of[ident], self.objects[k] = k, obj
        self.used.add(k)
        return k

    def keep_only_used(self) -> None:
        """Drop what the current batch does not use (called before a re-fork, which snapshots the
        table), so the table does not grow with every object ever sent."""
        self.objects = {k: self.objects[k] for k in self.used}
        self._key_of = {_identity(o): k for k, o in self.objects.items()}


def _identity(obj: Any) -> Any:
    # `splits.is_correct` makes a new bound-method object at every access; the pair it binds is
    # what stays the same (and the stored method keeps both alive, so their ids stay unique).
    if isinstance(obj, types.MethodType):
        return (id(obj.__self__), id(obj.__func__))
    return id(obj)


def _by_value(obj: Any) -> bool:
    """Plain data, and frozen dataclass records (e.g. an ``Example``), travel by value."""
    if type(obj) in _BY_VALUE:
        return True
    params = getattr(type(obj), "__dataclass_params__", None)
    return params is not None and params.frozen and not isinstance(obj, type)


class _RefPickler(pickle.Pickler):
    """Plain data by value, everything else as a key of ``refs``; with ``by_value=False`` every
    object below the top-level list is a key (the fallback for a batch that will not pickle)."""

    def __init__(self, file: io.BytesIO, refs: _Refs, by_value: bool = True) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._refs, self._by_value, self._top = refs, by_value, None

    def dump(self, obj: Any) -> None:
        self._top = obj
        super().dump(obj)

    def persistent_id(self, obj: Any) -> int | None:
        if obj is self._top:
            return None
        if self._by_value and _by_value(obj):
            return None
        return self._refs.key(obj)


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, objects: dict[int, Any]) -> None:
        super().__init__(file)
        self._objects = objects

    def persistent_load(self, pid: Any) -> Any:
        return self._objects[pid]


def _example_strings(obj: Any, out: set[str], depth: int = 0) -> set[str]:
    """Every string held by an example's plain data (question, reference answer, fields, task
    metadata), the text the worker may ``eval``."""
    if isinstance(obj, str):
        out.add(obj)
    elif depth < 6 and (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        for f in dataclasses.fields(obj):
            _example_strings(getattr(obj, f.name), out, depth + 1)
    elif depth < 6 and isinstance(obj, dict):
        for k, v in obj.items():
            _example_strings(k, out, depth + 1)
            _example_strings(v, out, depth + 1)
    elif depth < 6 and isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _example_strings(v, out, depth + 1)
    return out


def _guard_eval(trusted: set[str]) -> None:
    """In the worker only: ``eval`` of a string that is not the example's own data reads Python
    literals only (``ast.literal_eval``: lists, numbers, strings; no names, no calls), and
    ``exec`` of such a string is refused. Some reasoning-gym ``score_answer`` methods (n_queens,
    spiral_matrix, string_insertion, binary_matrix) call ``eval(answer)`` on the model's text, so
    an answer like ``__import__('os').system(...)`` would run; with this it is a ValueError,
    which they score as wrong. Evaluating the task's own expressions (bitwise_arithmetic's
    ``eval(problem)``) and compiled code objects (sympy's ``parse_expr``) is unchanged."""
    import ast
    import builtins

    real_eval, real_exec = builtins.eval, builtins.exec

    def text(source: Any) -> str | None:
        if isinstance(source, bytes):
            return source.decode("utf-8", "replace")
        return source if isinstance(source, str) else None

    def guarded_eval(source: Any, *args: Any, **kwargs: Any) -> Any:
        src = text(source)
        if src is not None and src not in trusted:
            return ast.literal_eval(src.strip())
        return real_eval(source, *args, **kwargs)

    def guarded_exec(source: Any, *args: Any, **kwargs: Any) -> Any:
        src = text(source)
        if src is not None and src not in trusted:
            raise ValueError("exec of text that is not the example's own data is refused in the verifier worker")
        return real_exec(source, *args, **kwargs)

    builtins.eval, builtins.exec = guarded_eval, guarded_exec


def _serve(tasks: Connection, results: Connection, objects: dict[int, Any], parent: int) -> None:
    """Worker loop: each message is a pickled list of ``(is_correct, answer, example)``; one
    ``(index, status)`` record goes back per item, as soon as it is known."""
    trusted: set[str] = set()
    _guard_eval(trusted)
    while True:
        while not tasks.poll(_PARENT_POLL_S):
            if os.getppid() != parent:
                return
        try:
            payload = tasks.recv_bytes()
        except EOFError:
            return
        for i, (is_correct, answer, example) in enumerate(_RefUnpickler(io.BytesIO(payload), objects).load()):
            trusted.clear()
            _example_strings(example, trusted)
            try:
                status = _RIGHT if is_correct(answer, example) else _WRONG
            except Exception:  # noqa: BLE001 - a verifier may raise anything on odd text
                status = _ERROR
            results.send_bytes(_RESULT.pack(i, status))


@dataclass
class _Worker:
    pid: int
    owner: int  # the pid that forked it: only that process may talk to it or reap it
    tasks: Connection
    results: Connection
    watermark: int  # keys below it were in the table when it forked
    reaped: bool = False  # waited for: its pid may belong to another process now, never signal it

    def stop(self) -> None:
        if os.getpid() != self.owner:
            return
        if not self.reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.reaped = True
        self.tasks.close()
        self.results.close()

    def alive(self) -> bool:
        if not self.reaped:
            try:
                self.reaped = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
            except ChildProcessError:
                self.reaped = True
        return not self.reaped


def _stop_worker(box: list[_Worker | None]) -> None:
    if box[0] is not None:
        box[0].stop()
        box[0] = None


class VerifierGuard:
    """Size cap and time limit for verifier calls (module docstring).

    Args:
        timeout_s: seconds each answer's verdict may take, > 0; ``None``: verify in this process
            without a time limit (``reward.verifier_timeout_s``).
        max_answer_chars: answers longer than this are incorrect without calling the verifier,
            >= 1 (``reward.max_answer_chars``).

    Raises:
        ValueError: ``timeout_s`` is not a finite number > 0 or ``None``; ``max_answer_chars`` is
            not an integer >= 1; a time limit is asked for on a platform without ``os.fork``.
    """

    def __init__(self, timeout_s: float | None = DEFAULT_TIMEOUT_S, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> None:
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
                math.isfinite(timeout_s) and timeout_s > 0
            ):
                raise ValueError(f"reward.verifier_timeout_s must be a number > 0 or null, got {timeout_s!r}")
            if not hasattr(os, "fork"):
                raise ValueError(
                    "reward.verifier_timeout_s needs os.fork (Linux, macOS); set reward.verifier_timeout_s=null "
                    "to verify in-process without a time limit"
                )
        if isinstance(max_answer_chars, bool) or not isinstance(max_answer_chars, int) or max_answer_chars < 1:
            raise ValueError(f"reward.max_answer_chars must be an integer >= 1, got {max_answer_chars!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.max_answer_chars = max_answer_chars
        self._refs = _Refs()
        self._box: list[_Worker | None] = [None]  # the live worker; a list so the finalizer can see it
        self._lock = threading.Lock()
        self._warned_reference = False
        weakref.finalize(self, _stop_worker, self._box)

    def __repr__(self) -> str:
        return f"VerifierGuard(timeout_s={self.timeout_s}, max_answer_chars={self.max_answer_chars})"

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process starts without a worker of its own.
        return {"timeout_s": self.timeout_s, "max_answer_chars": self.max_answer_chars}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["timeout_s"], state["max_answer_chars"])

    @property
    def worker_pid(self) -> int | None:
        """Process id of the live worker, ``None`` before the first batch and after :meth:`close`."""
        worker = self._box[0]
        return worker.pid if worker is not None and worker.owner == os.getpid() else None

    def close(self) -> None:
        """Stop the worker (a later batch forks a new one)."""
        _stop_worker(self._box)

    def verify(
        self, is_correct: Callable[[str, Any], bool], items: Sequence[tuple[str, Any]]
    ) -> GuardedVerdicts:
        """Verdicts of ``is_correct(answer, example)`` for each pair, under the cap and the limit.

        Args:
            is_correct: the verifier verdict, e.g. :meth:`calibrl.data.sources.DataSplits.is_correct`.
            items: ``(answer, example)`` pairs; answers are parsed answers (``str``).

        Returns:
            :class:`GuardedVerdicts`; a capped, timed-out or failed answer is incorrect. Never
            raises for anything a verifier or an answer does.
        """
        status: list[int | None] = [None] * len(items)
        counts = dict.fromkeys(COUNTERS, 0)
        todo = []
        for i, (answer, example) in enumerate(items):
            if answer is not None and len(answer) > self.max_answer_chars:
                status[i] = _WRONG
                counts["rewards/verifier_too_long"] += 1
            else:
                todo.append(i)
            self._check_reference(example)
        if self.timeout_s is None:
            for i in todo:
                status[i] = self._call(is_correct, *items[i])
        elif todo:
            with self._lock:
                self._in_worker(is_correct, items, todo, status, counts)
        counts["rewards/verifier_errors"] += sum(s == _ERROR for s in status)
        if counts["rewards/verifier_timeouts"]:
            log.warning("verifier timed out (> %gs) on %d answer(s); counted as incorrect",
                        self.timeout_s, counts["rewards/verifier_timeouts"])
        return GuardedVerdicts([s == _RIGHT for s in status], counts)

    def _check_reference(self, example: Any) -> None:
        reference = getattr(example, "answer", None)
        if not self._warned_reference and isinstance(reference, str) and len(reference) > self.max_answer_chars:
            self._warned_reference = True
            log.warning("a reference answer has %d characters, over reward.max_answer_chars=%d: answers that long "
                        "count as wrong without being verified", len(reference), self.max_answer_chars)

    @staticmethod
    def _call(is_correct: Callable[[str, Any], bool], answer: str, example: Any) -> int:
        try:
            return _RIGHT if is_correct(answer, example) else _WRONG
        except Exception:  # noqa: BLE001 - same policy as the worker
            return _ERROR

    def _in_worker(self, is_correct: Callable[[str, Any], bool], items: Sequence[tuple[str, Any]], todo: list[int],
                   status: list[int | None], counts: dict[str, int]) -> None:
        pos = 0
        while pos < len(todo):  # each pass: one worker, until the batch ends or the worker hangs or dies
            worker = self._send([(is_correct, *items[i]) for i in todo[pos:]])
            start, deadline = pos, time.monotonic() + self.timeout_s
            while pos < len(todo):
                try:
                    msg = worker.results.recv_bytes() if worker.results.poll(
                        max(0.0, deadline - time.monotonic())) else None
                except (EOFError, OSError):  # the worker died on this answer
                    status[todo[pos]] = _ERROR
                    break
                if msg is None:  # no verdict within timeout_s: hung
                    status[todo[pos]] = _WRONG
                    counts["rewards/verifier_timeouts"] += 1
                    break
                offset, verdict = _RESULT.unpack(msg)
                pos = start + offset  # the worker answers in order: this is the current answer
                status[todo[pos]] = verdict
                pos += 1
                deadline = time.monotonic() + self.timeout_s
            else:
                return
            self.close()  # the next pass forks a fresh worker for the rest
            pos += 1

    def _send(self, batch: list[tuple[Any, ...]]) -> _Worker:
        """Pickle the batch, make sure a worker holding every object it references is up, and hand
        the batch over."""
        try:
            self._refs.used, buf = set(), io.BytesIO()
            _RefPickler(buf, self._refs).dump(batch)
        except Exception:  # noqa: BLE001 - e.g. a record whose __reduce__ fails: send it by reference
            self._refs.used, buf = set(), io.BytesIO()
            _RefPickler(buf, self._refs, by_value=False).dump(batch)
        worker = self._worker_for_batch()
        try:
            worker.tasks.send_bytes(buf.getvalue())
        except OSError:  # it died since the liveness check: a fresh one takes the batch
            self.close()
            worker = self._worker_for_batch()
            worker.tasks.send_bytes(buf.getvalue())
        return worker

    def _worker_for_batch(self) -> _Worker:
        """The live worker if it holds every object the pickled batch references, else a new fork
        (the table first shrunk to this batch's objects)."""
        worker = self._box[0]
        if worker is not None and (
            worker.owner != os.getpid()
            or not worker.alive()
            or any(k >= worker.watermark for k in self._refs.used)
        ):
            if worker.owner == os.getpid():
                worker.stop()
            worker = self._box[0] = None
        if worker is None:
            self._refs.keep_only_used()
            worker = self._box[0] = self._fork()
        return worker

    def _fork(self) -> _Worker:
        task_r, task_w = Pipe(duplex=False)
        result_r, result_w = Pipe(duplex=False)
        parent = os.getpid()
        objects = self._refs.objects
        watermark = max(objects, default=-1) + 1
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork in a threaded process; the child only runs verifier
            # code and exits with os._exit, and a child that deadlocks is a timeout like any other.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 0
            try:
                keep = sorted({0, 1, 2, task_r.fileno(), result_w.fileno()})
                for lo, hi in zip([-1, *keep], [*keep, os.sysconf("SC_OPEN_MAX")]):
                    if lo + 1 < hi:  # closerange(a, a) closes everything from a on (close_range(a, -1))
                        os.closerange(lo + 1, hi)
                # The caller's handlers (e.g. the trainer's SIGTERM flag) are not the worker's:
                # a signal that ends the job ends it too.
                for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
                    if hasattr(signal, name):
                        signal.signal(getattr(signal, name), signal.SIG_DFL)
                _serve(task_r, result_w, objects, parent)
            except BaseException:  # noqa: BLE001 - the worker must never unwind into the caller's code
                code = 1
            finally:
                os._exit(code)
        task_r.close()
        result_w.close()
        return _Worker(pid, parent, task_w, result_r, watermark)
