"""Timing of distillation training cycles and the result files of the benchmarks, importing nothing of the project.

`benchmarks/train_cycle.py` (this project) and `benchmarks/original_train_cycle.py` (the original Self Forcing code,
whose `utils`, `model`, `pipeline` and `trainer` packages share their names with ours) both time with `CycleClock`
and write the same JSON keys, so the two files compare field by field.

A cycle is what the original counts as `dfake_gen_update_ratio` iterations: one generator update, then one critic
update in every iteration. It runs from the start of a generator update to the start of the next one; the generator
step and each critic step run from the start of their loss to the end of their optimizer step (CUDA-synchronised).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    return env


def write_result(name: str, result: dict) -> Path:
    """Write `<name>.json` under $OUT when set, else benchmarks/results/, atomically."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).with_name("results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def gpu_name_tag(device: torch.device) -> str:
    """`h100`, `h200`, ... for file names (`tiny_cpu` off the GPU: only the toy-width harness checks run there)."""
    if device.type != "cuda":
        return "tiny_cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "b200", "a100", "l40s"):
        if tag in name:
            return tag
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


class CyclesDone(Exception):
    """Raised at the start of the generator update after the last timed cycle: the benchmark has what it needs."""


GIB = 2.0 ** 30


class CycleClock:
    """Collects the timing of training cycles from two kinds of events, `start(role)` before a loss and `end(role)`
    after its optimizer step (`role` is "generator" or "critic"); every generator start closes the running cycle.

    The first `warmup` cycles are dropped; after `cycles` timed ones the next generator start raises `CyclesDone`.
    `profile_cycle` (0-based among the timed ones, or None) runs under torch.profiler. `on_cycle(clock)` is called
    after every closed cycle (the scripts write their JSON there, so a run cut short keeps what it measured).
    """

    def __init__(self, device: torch.device, warmup: int, cycles: int, profile_cycle: Optional[int] = None,
                 on_cycle: Optional[Callable[["CycleClock"], None]] = None, log: Callable[[str], None] = print):
        if cycles < 1 or warmup < 0:
            raise ValueError(f"need cycles >= 1 and warmup >= 0, got cycles={cycles}, warmup={warmup}")
        self.device, self.warmup, self.cycles = device, warmup, cycles
        self.profile_cycle, self.on_cycle, self.log = profile_cycle, on_cycle, log
        self.timed: list[dict[str, Any]] = []
        self.warmup_s: list[float] = []
        self.profile_table: Optional[str] = None
        self._cycle_start: Optional[float] = None
        self._steps: dict[str, list[float]] = {}
        self._open: dict[str, float] = {}
        self._profiler = None
        self._started = time.perf_counter()

    # ----------------------------------------------------------------------------------------------- events
    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, role: str) -> None:
        if role == "generator":
            self._close_cycle()
            self._open_cycle()
        self._open[role] = self._sync()

    def end(self, role: str) -> None:
        if role not in self._open:
            raise RuntimeError(f"CycleClock.end({role!r}) without a start")
        self._steps.setdefault(role, []).append(self._sync() - self._open.pop(role))

    def finish(self) -> None:
        """Close the running cycle without waiting for the next generator start (the harness stops there)."""
        self._close_cycle()

    # ----------------------------------------------------------------------------------------------- cycles
    def _open_cycle(self) -> None:
        if len(self.timed) >= self.cycles:
            raise CyclesDone
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._profiling_next():
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        self._steps = {}
        self._cycle_start = self._sync()

    def _profiling_next(self) -> bool:
        return (self.profile_cycle is not None and len(self.warmup_s) >= self.warmup
                and len(self.timed) == self.profile_cycle)

    def _close_cycle(self) -> None:
        if self._cycle_start is None:
            return
        seconds = self._sync() - self._cycle_start
        self._cycle_start = None
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            self.profile_table = self._profiler.key_averages().table(sort_by=sort, row_limit=30)
            self._profiler = None
        generator, critic = self._steps.get("generator", []), self._steps.get("critic", [])
        if len(self.warmup_s) < self.warmup:
            self.warmup_s.append(seconds)
            self.log(f"[cycle] {time.perf_counter() - self._started:7.1f} s  warm-up cycle {len(self.warmup_s)}/"
                     f"{self.warmup}: {seconds:.2f} s")
        else:
            cuda = self.device.type == "cuda"
            self.timed.append({
                "cycle_s": seconds,
                "generator_step_s": generator[0] if generator else None,
                "critic_step_s": statistics.fmean(critic) if critic else None,
                "critic_steps_s": critic,
                "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB if cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB if cuda else None,
                "profiled": self.profile_table is not None and len(self.timed) == self.profile_cycle,
            })
            self.log(f"[cycle] {time.perf_counter() - self._started:7.1f} s  timed cycle {len(self.timed)}/"
                     f"{self.cycles}: {seconds:.2f} s (generator {self.timed[-1]['generator_step_s'] or 0:.2f} s, "
                     f"critic {self.timed[-1]['critic_step_s'] or 0:.2f} s per step)")
        if self.on_cycle is not None:
            self.on_cycle(self)

    # ----------------------------------------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        """The JSON fields both sides share (medians over the timed cycles; a profiled cycle is left out of the
        medians when there are others, since the profiler slows the host)."""
        plain = [c for c in self.timed if not c["profiled"]] or self.timed

        def median(key: str) -> Optional[float]:
            values = [c[key] for c in plain if c[key] is not None]
            return statistics.median(values) if values else None

        def peak(key: str) -> Optional[float]:
            values = [c[key] for c in self.timed if c[key] is not None]
            return max(values) if values else None
        return {"warmup_cycles": self.warmup, "timed_cycles": self.cycles, "complete": len(self.timed) >= self.cycles,
                "warmup_cycle_s": self.warmup_s, "cycles": self.timed,
                "cycle_s_median": median("cycle_s"), "generator_step_s_median": median("generator_step_s"),
                "critic_step_s_median": median("critic_step_s"),
                "peak_allocated_gib": peak("peak_allocated_gib"), "peak_reserved_gib": peak("peak_reserved_gib"),
                "profile": self.profile_table}

    def rows(self) -> list[tuple[str, str]]:
        s = self.summary()

        def fmt(value: Optional[float], unit: str) -> str:
            return "-" if value is None else f"{value:.2f} {unit}"
        return [("cycles timed", f"{len(self.timed)}/{self.cycles} (after {len(self.warmup_s)} warm-up)"),
                ("s per cycle (median)", fmt(s["cycle_s_median"], "s")),
                ("s per generator step", fmt(s["generator_step_s_median"], "s")),
                ("s per critic step", fmt(s["critic_step_s_median"], "s")),
                ("peak allocated", fmt(s["peak_allocated_gib"], "GiB")),
                ("peak reserved", fmt(s["peak_reserved_gib"], "GiB"))]


# ------------------------------------------------------------------------------------------------ comparison
COMPARED = (("s per cycle", "cycle_s_median"), ("s per generator step", "generator_step_s_median"),
            ("s per critic step", "critic_step_s_median"), ("peak allocated GiB", "peak_allocated_gib"),
            ("peak reserved GiB", "peak_reserved_gib"))


def comparison(ours: dict, original: dict) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
    """(what, ours, original, ours / original) for the medians and peaks of two result files; peaks are also given
    without the text encoder's weights (the original's side runs a stub encoder)."""
    rows = []
    for label, key in COMPARED:
        rows.append((label, ours.get(key), original.get(key)))
        if key.startswith("peak_") and ours.get(key) is not None and original.get(key) is not None:
            rows.append((label + " without text encoder", ours[key] - (ours.get("text_encoder_gib") or 0.0),
                         original[key] - (original.get("text_encoder_gib") or 0.0)))
    return [(label, a, b, a / b if a is not None and b else None) for label, a, b in rows]


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Compare two training-cycle results: ours / original.")
    p.add_argument("ours")
    p.add_argument("original")
    args = p.parse_args(argv)
    ours, original = (json.loads(Path(f).read_text()) for f in (args.ours, args.original))
    if ours.get("env", {}).get("device") != original.get("env", {}).get("device"):
        print(f"warning: different devices: {ours.get('env', {}).get('device')} vs "
              f"{original.get('env', {}).get('device')}")

    def fmt(value: Optional[float], digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    print(f"{'':<36}{'ours':>10}{'original':>10}{'ratio':>8}")
    for label, a, b, ratio in comparison(ours, original):
        print(f"{label:<36}{fmt(a):>10}{fmt(b):>10}{fmt(ratio, 3):>8}")
    print(f"timed cycles: ours {len(ours.get('cycles', []))}, original {len(original.get('cycles', []))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
