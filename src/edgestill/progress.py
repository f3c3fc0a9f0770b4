"""Progress bars (rate and ETA) for every long phase; quiet on non-zero DDP ranks."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=disable or not is_main_process() or os.environ.get("EDGESTILL_NO_PROGRESS") == "1",
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )


def close_progress_bars() -> None:
    """Close every open bar (ending its line), so that a message printed next starts on a line of its own.

    A bar left open by an exception would otherwise carry the error on the end of its last line.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
