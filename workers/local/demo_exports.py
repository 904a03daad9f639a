"""`fleettune demo --formats ...`: the demo's final version exported for on-device runtimes.

The same function the `fleettune.export` task runs (shared/export/exporter.py), called in process on
the embedded store once the rounds are done: one line per format, as the issue's demo asks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from fleettune.shared.export import exporter
from fleettune.shared.federation import FederationConfig


@contextlib.contextmanager
def _converters_quiet() -> Iterator[None]:
    """The converters narrate every pass on stdout and stderr (some from C++): the demo prints its own
    line per format instead. A failure still surfaces: export_version raises it with its reason."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def export_lines(runtime, config: FederationConfig, version: int, formats: tuple[str, ...]) -> list[str]:
    lines = []
    for fmt in formats:
        try:
            with _converters_quiet():
                record = exporter.export_version(runtime.store, runtime.settings, config, version, fmt)
        except exporter.ExportFailed as exc:
            lines.append(f"format {fmt}: failed: {exc.reason}")
            continue
        measured = record["parity"]
        diff = measured["max_abs_logit_diff"]
        if diff is None:
            checked = measured["checked"]
            lines.append(f"({fmt}: {measured['not_measured']}; checked instead: the package's {checked['inputs']} "
                         f"inputs, its {len(checked['ops'])} MIL ops for {checked['target']}, and "
                         f"{checked['base_weights_checked']} base weights unchanged)")
        lines.append(f"format {fmt}: max |logit diff| {'n/a' if diff is None else f'{diff:.2e}'}, "
                     f"base {record['base']['size']} bytes, adapter {record['adapter']['size']} bytes")
    return lines
