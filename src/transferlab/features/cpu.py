"""The identity of the CPU that runs the engines: what a speed verdict is only valid for.

Which engine path is fastest depends on the CPU: XNNPACK's int8 kernels win where the CPU has
8-bit dot products (AVX-512 VNNI, AVX-VNNI, AMX; Arm's dot product and i8mm), its float32
kernels can win on AVX2 alone (issue 15: on a 2-core AVX2 EPYC the int8 rewrite of MobileNet v1
ran at 57 images/s against 70 for the file as given; on an AVX-512 VNNI EPYC it runs about 1.4x
faster than the file as given). So a verdict measured on one machine must not be served on
another through a shared cache folder: :mod:`transferlab.features.engine_choice` files each
verdict under :attr:`CpuIdentity.key`, which changes with the model name, any of the
:data:`RELEVANT_FLAGS` and the number of CPUs this process may use.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Flags that change which kernels XNNPACK (or any engine) can use; other flags do not move speed verdicts.
RELEVANT_FLAGS = (
    # x86
    "sse4_1",
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # Arm (Features line)
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


@dataclass(frozen=True)
class CpuIdentity:
    """A CPU as far as engine speed goes.

    Attributes:
        model: the model name (``/proc/cpuinfo``'s ``model name``, else the platform's processor).
        flags: the :data:`RELEVANT_FLAGS` it has, sorted.
        cpus: how many CPUs this process may run on (its affinity), which moves batch and thread choices.
    """

    model: str
    flags: tuple[str, ...]
    cpus: int

    @property
    def description(self) -> str:
        """One line for reports: ``AMD EPYC; 2 CPUs; avx2 avx512_vnni fma ...``."""
        return f"{self.model}; {self.cpus} CPUs; {' '.join(self.flags) or 'no relevant flags'}"

    @property
    def key(self) -> str:
        """16 hex digits naming this identity in file names (the sha256 of its description)."""
        return hashlib.sha256(self.description.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        """The identity as a JSON-ready mapping (for verdicts and metrics)."""
        return {"model": self.model, "cpus": self.cpus, "flags": list(self.flags), "key": self.key}


def parse_cpuinfo(text: str, *, cpus: int) -> CpuIdentity:
    """The identity described by the text of ``/proc/cpuinfo`` (its first processor's block).

    Args:
        text: the file's text.
        cpus: how many CPUs the process may use.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: every core of one machine has the same flags
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu part") or platform.processor()
    present = set((fields.get("flags") or fields.get("features") or "").split())
    return CpuIdentity(model=model or "unknown", flags=tuple(sorted(present & set(RELEVANT_FLAGS))), cpus=max(1, cpus))


@functools.lru_cache(maxsize=1)
def current() -> CpuIdentity:
    """The identity of the CPU this process runs on (read once per process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:  # no /proc: the platform's processor name and machine stand in for the flags
        return CpuIdentity(model=f"{platform.processor() or 'unknown'} ({platform.machine()})", flags=(), cpus=cpus)
    return parse_cpuinfo(text, cpus=cpus)
