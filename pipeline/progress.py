"""Progress of the long stages: a bar on a terminal, one line in a log.

``extract`` counts images and ``sweep`` counts trials. On a terminal the user sees a tqdm bar
with the count, rate and time left; when stderr is a pipe or a file (CI, ``mlflow run`` logs,
``2> log``) a redrawn bar would fill the log with carriage returns, so the stage says in one
line what it is about to do and its own summary line says how it ended.
"""

from __future__ import annotations

import sys


def progress_bar(desc: str, total: int, noun: str, initial: int = 0, enabled: bool | None = None):
    """A tqdm bar over ``total`` ``noun``s (``initial`` already done), or one line on stderr.

    ``enabled`` forces the bar on or off; ``None`` shows it when stderr is a terminal. The
    returned object is a tqdm either way (disabled when there is no bar): ``update`` and
    ``close`` it as usual.
    """
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() if enabled is None else enabled
    if not interactive:
        done = f" ({initial} done before)" if initial else ""
        print(f"{desc}: {total - initial} {noun}{'' if total - initial == 1 else 's'} to go{done}",
              file=sys.stderr, flush=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=f" {noun}", disable=not interactive,
                dynamic_ncols=True, file=sys.stderr)
