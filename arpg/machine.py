"""What machine this is, for timings and kernel choices: the CPU's model name and feature flags
(torch-free; read from /proc/cpuinfo where there is one)."""

from __future__ import annotations

import platform


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())
