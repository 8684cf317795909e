"""A worker process that proves a grammar compiles within a time and memory budget.

xgrammar compiles in C++ threads that Python cannot stop, and a compiled grammar does not cross
processes cheaply (its JSON grows with the square of the schema). So a new grammar is compiled
twice: first here, in a spawned process under ``RLIMIT_AS`` (memory) and a deadline (the parent
kills it on time-out or when the request is cancelled), then, once it finished within budget, by
the caller in its own process, where the same input does the same bounded work::

    caller                                worker (a new python, RLIMIT_AS = its size + memory budget)
      check(kind, source) --------------->  compile_fn(compiler, kind, source)
      poll every 50 ms: deadline? cancel?   <--- ("ok", bytes) | ("error", message)
      on either: kill, start a fresh worker (in the background), raise GrammarBudgetError
"""

from __future__ import annotations

import importlib
import pickle
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from agentspec.engine.grammar_budget import GrammarBudgetError, GrammarLimits

POLL_S = 0.05
START_TIMEOUT_S = 120.0  # a new worker imports torch and xgrammar: seconds on a busy machine


class CompileCancelled(Exception):
    """The request that asked for the compile went away; the worker was stopped."""


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    data = stream.read(struct.unpack(">I", head)[0])
    return pickle.loads(data)


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    """The worker (``python -c '...main()' MODULE:FUNCTION MEMORY_BYTES``): compile each
    ``(kind, source)`` read from stdin with ``FUNCTION(xgr, compiler, kind, source)``, answer its size or error."""
    import xgrammar as xgr  # deferred: only the worker process needs it at import time

    target, memory_bytes = sys.argv[1], int(sys.argv[2])
    module, _, name = target.partition(":")
    compile_fn = getattr(importlib.import_module(module), name)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        info = xgr.TokenizerInfo.deserialize_json(_receive(stdin))
    except (EOFError, pickle.UnpicklingError):  # the caller went away while this worker started
        return
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    _send(stdout, ("ready", 0))
    while True:
        try:
            kind, source = _receive(stdin)
        except EOFError:
            return
        try:
            compiled = compile_fn(xgr, compiler, kind, source)
            _send(stdout, ("ok", int(compiled.memory_size_bytes)))
        except MemoryError:
            _send(stdout, ("memory", 0))
        except Exception as exc:  # noqa: BLE001 - the worker reports every failure to its caller
            message = str(exc)
            _send(stdout, ("memory" if "bad_alloc" in message else "error", message))


class CompileWorker:
    """One spawned compile worker, restarted after a time-out, a cancel or a crash; calls are serialised."""

    def __init__(self, tokenizer_info_json: str, limits: GrammarLimits, compile_fn: str) -> None:
        """``compile_fn``: ``"module:function"``, called as ``function(xgr, compiler, kind, source)``."""
        self._info, self._limits, self._compile_fn = tokenizer_info_json, limits, compile_fn
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self.restarts = 0
        threading.Thread(target=self._start_locked, daemon=True, name="agentspec-grammar-worker").start()

    def check(self, kind: str, source: str, cancel: threading.Event | None = None) -> int:
        """Compile in the worker; the compiled grammar's size in bytes. ``ValueError`` for an invalid
        grammar, :class:`GrammarBudgetError` over the time or memory budget, :class:`CompileCancelled`."""
        with self._lock:
            if not self._alive():
                self._start()
            _send(self._process.stdin, (kind, source))
            deadline = time.monotonic() + self._limits.compile_timeout_s
            while not select.select([self._process.stdout], [], [], POLL_S)[0]:
                if cancel is not None and cancel.is_set():
                    self._restart()
                    raise CompileCancelled("the request was cancelled while its grammar compiled")
                if time.monotonic() > deadline or not self._alive():
                    timed_out = self._alive()
                    self._restart()
                    if timed_out:
                        raise GrammarBudgetError("compile_timeout_s", f"the grammar did not compile within "
                                                                      f"{self._limits.compile_timeout_s} s")
                    raise GrammarBudgetError("compile_memory_bytes", "the grammar compile ran out of its memory "
                                                                     f"budget of {self._limits.compile_memory_bytes} "
                                                                     "bytes")
            try:
                status, detail = _receive(self._process.stdout)
            except EOFError:
                status, detail = "memory", 0
        if status == "ok":
            return int(detail)
        if status == "memory":
            self._restart_async()
            raise GrammarBudgetError("compile_memory_bytes", "the grammar compile ran out of its memory budget of "
                                                             f"{self._limits.compile_memory_bytes} bytes")
        raise ValueError(detail)

    def close(self) -> None:
        """Stop the worker (a later :meth:`check` starts a new one)."""
        with self._lock:
            self._stop()

    # ------------------------------------------------------------------ process
    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start_locked(self) -> None:
        with self._lock:
            if not self._alive():
                self._start()

    def _start(self) -> None:
        """A fresh worker (a new interpreter: no copy of the caller's threads or memory)."""
        self._stop()
        command = [sys.executable, "-c", "from agentspec.engine.grammar_worker import main; main()", self._compile_fn,
                   str(self._limits.compile_memory_bytes)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _send(process.stdin, self._info)
        if not select.select([process.stdout], [], [], START_TIMEOUT_S)[0]:
            process.kill()
            raise RuntimeError("the grammar compile worker did not start")
        _receive(process.stdout)
        self._process = process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdin.close()
            self._process.stdout.close()
        self._process = None

    def _restart(self) -> None:
        """Kill the worker now (the lock is held) and start the next one in the background."""
        self._stop()
        self.restarts += 1
        self._restart_async()

    def _restart_async(self) -> None:
        threading.Thread(target=self._start_locked, daemon=True, name="agentspec-grammar-worker").start()

