"""A progress bar that reads well both on a terminal and in a CI log."""

from __future__ import annotations

import time
from typing import TextIO


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm bar on a terminal; on anything else (CI logs, pipes) the same bar as whole lines, about
    every tenth of the run, since carriage-return redraws turn into one unreadable line in a log.
    `stream=None` shows nothing."""

    def __init__(
        self, total: int, stream: TextIO | None, desc: str = "train", unit: str = "step", initial: int = 0
    ):
        self.total, self.stream, self.desc, self.unit = total, stream, desc, unit
        self.every = max(1, total // 10)
        self.start = time.perf_counter()
        self.initial = initial
        self.bar = None
        if stream is not None and isatty(stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True
            )

    def update(self, step: int, **postfix: str) -> None:
        """Step `step` (1-based, out of total) is done; `postfix` items are shown after the bar."""
        text = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % 5 == 0 or step == self.total:
                self.bar.set_postfix_str(text, refresh=False)
        elif self.stream is not None and (
            step % self.every == 0 or step == self.total or step == self.initial + 1
        ):
            from tqdm import tqdm

            line = tqdm.format_meter(
                step,
                self.total,
                time.perf_counter() - self.start,
                ncols=100,
                prefix=self.desc,
                ascii=True,
                unit=self.unit,
                postfix=text,
                initial=self.initial,
            )
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
