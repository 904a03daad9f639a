"""`fleettune demo --formats ...`: the demo's final version exported for on-device runtimes.

The same function the `fleettune.export` task runs (shared/export/exporter.py), called in process on
the embedded store once the rounds are done: one line per format, as the issue's demo asks.
"""

from __future__ import annotations

from fleettune.shared.export import exporter
from fleettune.shared.federation import FederationConfig


def export_lines(runtime, config: FederationConfig, version: int, formats: tuple[str, ...]) -> list[str]:
    lines = []
    for fmt in formats:
        try:
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
