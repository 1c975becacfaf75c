"""The CPU identity that engine verdicts are filed under (transferlab.features.cpu)."""

from __future__ import annotations

from transferlab.features import cpu

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_1 sse4_2 avx f16c fma avx2 rdrand {extra}

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu something_else_entirely
"""


def identity(extra: str = "", cpus: int = 2) -> cpu.CpuIdentity:
    return cpu.parse_cpuinfo(CPUINFO.format(extra=extra), cpus=cpus)


def test_the_identity_names_the_model_the_kernel_flags_and_the_cpus():
    parsed = identity()
    assert parsed.model == "AMD EPYC 7B13" and parsed.cpus == 2
    assert parsed.flags == ("avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2"), "the first processor's, relevant only"
    assert parsed.description == "AMD EPYC 7B13; 2 CPUs; avx avx2 f16c fma sse4_1 sse4_2"
    assert parsed.as_dict() == {"model": "AMD EPYC 7B13", "cpus": 2, "flags": list(parsed.flags), "key": parsed.key}


def test_the_key_changes_with_every_flag_that_moves_kernel_speed_and_only_with_those():
    base = identity().key
    assert len(base) == 16 and identity("rdseed sha_ni").key == base, "flags no kernel depends on change nothing"
    keys = {identity(flag).key for flag in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")}
    assert len(keys) == 5 and base not in keys
    assert identity(cpus=16).key != base, "batch and thread choices depend on how many CPUs there are"
    assert cpu.parse_cpuinfo(CPUINFO.format(extra="").replace("7B13", "7763"), cpus=2).key != base


def test_an_arm_cpuinfo_reads_its_features_line():
    arm = cpu.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\nCPU part\t: 0xd40\n", cpus=4)
    assert arm.flags == ("asimd", "asimddp", "i8mm", "sve") and arm.model == "0xd40"


def test_this_machine_has_an_identity():
    here = cpu.current()
    assert here.cpus >= 1 and here.model and here is cpu.current(), "read once per process"
