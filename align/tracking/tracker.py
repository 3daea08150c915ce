"""One tracker for every stage: metrics go to ``metrics.jsonl`` (always) and to W&B (optional).

W&B mode: ``off`` never imports wandb; ``auto`` (default) logs offline unless ``WANDB_API_KEY`` is set or
``WANDB_MODE=online``, so runs never block on the network and can be uploaded later with ``wandb sync``. The config
sent to W&B is redacted: a value interpolated from the environment (``align.config.compose.redacted``) is never sent.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

WandbSetting = str  # "auto" | "off" | "offline" | "online"


def wandb_mode(setting: WandbSetting = "auto") -> str | None:
    """The W&B mode to use, or None for no W&B at all."""
    if setting == "off":
        return None
    if setting in ("offline", "online"):
        return setting
    if setting != "auto":
        raise ValueError(f"tracking.wandb={setting!r}: expected one of auto, off, offline, online")
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return None if os.environ["WANDB_MODE"] == "disabled" else os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Append-only metrics log for one stage. ``log`` writes one JSON line per call with the step and wall time."""

    def __init__(self, out_dir: str | Path, name: str = "run", config: dict | None = None,
                 wandb: WandbSetting = "off", project: str = "align", group: str | None = None,
                 job_type: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._start = time.time()
        self._run = None
        mode = wandb_mode(wandb)
        # under `wandb agent` every wandb.init joins the agent's run (WANDB_RUN_ID): stage steps would go backwards
        self._shared_run = bool(os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"))
        if mode is not None:
            import wandb as wb

            from align.config.compose import redacted

            os.environ.setdefault("WANDB_DIR", str(self.out_dir))
            # W&B stores the config (and offline, writes it under the run directory): never a value from the
            # environment (``${oc.env:WANDB_API_KEY}``), which shows as <from env: NAME>
            self._run = wb.init(project=project, name=name, config=redacted(config or {}), mode=mode, group=group,
                                job_type=job_type, dir=str(self.out_dir), reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time() - self._start, 3), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._run is not None:
            values = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
            if self._shared_run:  # a W&B sweep agent's one run: every stage logs into it, so W&B steps its own
                self._run.log({**values, "stage_step": float(step)})
            else:
                self._run.log(values, step=step)

    def close(self) -> None:
        self._file.close()
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
