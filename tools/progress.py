"""A progress line for long CLI work done in stages: it names the stage that is running with
its own timer (redrawn twice a second on a terminal; one line per stage otherwise) and ends
with one line of per-stage times."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, Optional


class StageDisplay:
    def __init__(self, title: str, stream=None, interval: float = 0.5):
        self.title, self.stream, self.interval = title, stream or sys.stderr, interval
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.seconds: Dict[str, float] = {}
        self._name: Optional[str] = None
        self._t0 = self._start = time.perf_counter()
        self._cpu0 = _cpu()                  # on a shared machine wall time says little
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._redraw, daemon=True) if self.live else None
        if self._thread:
            self._thread.start()

    def __call__(self, name: str) -> None:
        """Stage `name` starts now (the previous one ends)."""
        with self._lock:
            self._end()
            self._name, self._t0 = name, time.perf_counter()
            if not self.live:
                print(f"{self.title}: {name} ...", file=self.stream, flush=True)

    def _end(self) -> None:
        if self._name is not None:
            dt = time.perf_counter() - self._t0
            self.seconds[self._name] = self.seconds.get(self._name, 0.0) + dt
            if not self.live:
                print(f"{self.title}: {self._name} done in {dt:.1f} s", file=self.stream, flush=True)
            self._name = None

    def _redraw(self) -> None:
        while not self._done.wait(self.interval):
            with self._lock:
                if self._name is not None:
                    now = time.perf_counter()
                    self.stream.write(f"\r{self.title}: {self._name} {now - self._t0:6.1f} s "
                                      f"(total {now - self._start:6.1f} s)\033[K")
                    self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._end()
        self._done.set()
        if self._thread:
            self._thread.join()
            self.stream.write("\r\033[K")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def summary(self) -> str:
        """'stages: a 1.0 s, b 2.5 s; total 3.5 s (CPU 3.1 s)'"""
        parts = ", ".join(f"{n} {s:.1f} s" for n, s in self.seconds.items())
        return (f"stages: {parts}; total {time.perf_counter() - self._start:.1f} s "
                f"(CPU {_cpu() - self._cpu0:.1f} s)")


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished children (the export's
    decoder runs in one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
