"""Run logging: a JSONL file of scalars in the logdir, wandb (offline unless a key or host is configured), and a
progress bar, all on rank 0 only.

wandb is imported lazily, only when enabled, and the API key is never logged (it is redacted from the config that
is uploaded and from every file we write).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"
_SECRET_KEYS = ("wandb_key",)


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with secrets replaced by a marker (set/unset stays visible)."""
    out = {}
    for key, value in config.items():  # secrets sit in a section (logging.wandb_key) or at the top (flat configs)
        if key in _SECRET_KEYS and value:
            value = "<redacted>"
        out[key] = redact(value) if isinstance(value, dict) else value
    return out


def warn(message: str) -> None:
    """A warning on stderr (every rank: a skipped step on rank 3 matters)."""
    warnings.warn(message, RuntimeWarning, stacklevel=2)


class RunLogger:
    """`log(step, scalars)` appends one JSON line (and a wandb row); `progress(step, scalars)` moves the bar.

    Everything is a no-op on ranks other than 0. `wandb_mode`: "online", "offline" or None (off).
    """

    def __init__(self, logdir: str | Path, *, rank: int = 0, config: dict[str, Any] | None = None,
                 wandb_mode: Optional[str] = None, wandb_dir: str | Path | None = None, run_name: str = "",
                 wandb_project: Optional[str] = None, wandb_entity: Optional[str] = None,
                 wandb_host: Optional[str] = None, wandb_key: Optional[str] = None,
                 total_steps: int = 0, initial_step: int = 0, progress_bar: bool = True):
        self.rank = rank
        self.logdir = Path(logdir)
        self._wandb = None
        self._bar = None
        self._file = None
        if rank != 0:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        _keep_rows_up_to(self.logdir / METRICS_FILE, initial_step)
        self._file = open(self.logdir / METRICS_FILE, "a", encoding="utf-8")
        if wandb_mode:
            self._wandb = _start_wandb(wandb_mode, wandb_dir or self.logdir, run_name, redact(config or {}),
                                       wandb_project, wandb_entity, wandb_host, wandb_key)
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, disable=None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self._file is None:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in scalars.items()}, step=step)

    def progress(self, step: int, scalars: dict[str, float]) -> None:
        if self._bar is None:
            return
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if k.endswith("loss")}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows after `step` (those of a run that ended after logging them but before its next checkpoint; a
    resumed run logs those steps again) and a torn last line; rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed process
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)


def wandb_mode(cfg: Any) -> Optional[str]:
    """None when disabled; "online" when a key or host is configured; otherwise "offline" (sync later)."""
    if cfg.logging.disable_wandb:
        return None
    return "online" if (cfg.logging.wandb_key or cfg.logging.wandb_host) else "offline"


def _start_wandb(mode: str, save_dir: str | Path, name: str, config: dict[str, Any], project: Optional[str],
                 entity: Optional[str], host: Optional[str], key: Optional[str]):
    import wandb  # lazily: importing wandb costs seconds and spawns nothing until init

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "online" and (key or host):
        # login() takes the key directly: it is never put into the environment, the config or a log line.
        wandb.login(key=key, host=host, relogin=False)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project or "self-forcing", entity=entity, name=name or None, config=config,
                      dir=str(save_dir), mode=mode)
