"""The real CPUID/MSR dumps in tests/data/cpuid/ (see its README.md), by name, for the probe tests.

The dumps are part of the repository: a test never skips for a missing dump; it fails.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "data" / "cpuid"

CONROE = "GenuineIntel00006F6_Conroe_CPUID.txt"
HASWELL_EP = "GenuineIntel00306F2_HaswellEP_00_CPUID.txt"
ALDER_LAKE_N = "GenuineIntel00B06E0_AlderLakeN_02_CPUID.txt"
SAPPHIRE_RAPIDS = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"
WINDSOR = "AuthenticAMD0040F33_K8_Windsor_CPUID.txt"
BARCELONA = "AuthenticAMD0100F21_K10_Barcelona_CPUID.txt"
SUMMIT_RIDGE = "AuthenticAMD0800F11_K17_Zen3_CPUID.txt"  # a Ryzen 5 1500X: Zen 1, family 17h
GRANITE_RIDGE = "AuthenticAMD0B40F40_K20_GraniteRidge_02_CPUID.txt"
ZHAOXIN = "CentaurHauls00307B1_ZXE_CPUID.txt"
# The older layout (sub-leaves as repeated lines without [SL nn]), CPU #0's CPUID records only:
# no MSRs, so it is in none of the lists below, which MSR-decoding tests iterate over.
NEHALEM_EP = "GenuineIntel00106A2_Nehalem-EP_CPUID.txt"

INTEL = [CONROE, HASWELL_EP, ALDER_LAKE_N, SAPPHIRE_RAPIDS]
AMD = [WINDSOR, BARCELONA, SUMMIT_RIDGE, GRANITE_RIDGE]
ALL = INTEL + AMD + [ZHAOXIN]  # every named dump with MSRs; ZHAOXIN is a VMX CPU too
EVERY = ALL + [NEHALEM_EP]  # every dump in FIXTURES (test_probe_dump checks there is no other)
