"""Whole-machine memory while a benchmark runs: every process's PSS, grouped (driver, Ray head, PostgreSQL, other)."""

from __future__ import annotations

import threading


class MachineMemory:
    """Samples every process's PSS (shared pages counted once, split among the processes mapping them), grouped:
    the benchmark's driver process (and its children), the Ray head's processes (raylet, GCS, workers...),
    PostgreSQL's, and everything else; plus /dev/shm (Ray's object store) and the machine's used memory."""

    def __init__(self, ray_head_pid: int | None, postgres_pid: int | None, interval: float):
        self.roots = {"ray head": ray_head_pid, "postgresql": postgres_pid}
        self.interval, self.driver_pid = interval, None
        self.baseline: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, pid: int) -> None:
        self.driver_pid = pid

    def sample(self) -> dict[str, float]:
        import psutil

        groups: dict[int, str] = {}
        for name, pid in [*self.roots.items(), ("driver", self.driver_pid)]:
            if pid is None:
                continue
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    groups[proc.pid] = name
            except psutil.Error:
                continue
        totals = dict.fromkeys(["driver", "ray head", "postgresql", "other"], 0.0)
        for proc in psutil.process_iter():
            try:
                pss = proc.memory_full_info().pss
            except psutil.Error:
                continue
            totals[groups.get(proc.pid, "other")] += pss
        totals["machine (all PSS)"] = sum(totals.values())
        totals["benchmark (driver + Ray + PostgreSQL)"] = totals["driver"] + totals["ray head"] + totals["postgresql"]
        memory = psutil.virtual_memory()
        totals["machine used (total - available)"] = memory.total - memory.available
        totals["/dev/shm"] = psutil.disk_usage("/dev/shm").used
        return totals

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, value in self.sample().items():
                self.peak[name] = max(self.peak.get(name, 0.0), value)

    def __enter__(self) -> MachineMemory:
        self.baseline = self.sample()
        self.peak = dict(self.baseline)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def report(self, title: str) -> None:
        print(f"  memory, {title}: peak (baseline before the call) in GiB")
        for name in self.peak:
            print(f"    {name:<40} {self.peak[name] / 2**30:6.2f}  ({self.baseline.get(name, 0) / 2**30:.2f})")
