"""The real CPUID/MSR dumps in ../shared/fixtures/cpuid/, by name, for the probe tests."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cpuid"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"CPUID/MSR dump fixtures not found at {FIXTURES} (shared/ beside the repository)",
)

CONROE = "GenuineIntel00006F6_Conroe_CPUID.txt"
HASWELL_EP = "GenuineIntel00306F2_HaswellEP_00_CPUID.txt"
ALDER_LAKE_N = "GenuineIntel00B06E0_AlderLakeN_02_CPUID.txt"
SAPPHIRE_RAPIDS = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"
WINDSOR = "AuthenticAMD0040F33_K8_Windsor_CPUID.txt"
BARCELONA = "AuthenticAMD0100F21_K10_Barcelona_CPUID.txt"
SUMMIT_RIDGE = "AuthenticAMD0800F11_K17_Zen3_CPUID.txt"  # a Ryzen 5 1500X: Zen 1, family 17h
GRANITE_RIDGE = "AuthenticAMD0B40F40_K20_GraniteRidge_02_CPUID.txt"
ZHAOXIN = "CentaurHauls00307B1_ZXE_CPUID.txt"

INTEL = [CONROE, HASWELL_EP, ALDER_LAKE_N, SAPPHIRE_RAPIDS]
AMD = [WINDSOR, BARCELONA, SUMMIT_RIDGE, GRANITE_RIDGE]
ALL = INTEL + AMD + [ZHAOXIN]  # every named dump; ZHAOXIN is a VMX CPU too
