"""scripts/kvm_unit_tests.py: reading kvm-unit-tests' runner, and its skip without a checkout."""

from __future__ import annotations

from script_modules import load_script

kut = load_script("kvm_unit_tests.py")

RUNNER_OUTPUT = (
    "\x1b[32mPASS\x1b[0m smptest (1 tests)\n"
    "\x1b[32mPASS\x1b[0m vmexit_cpuid \n"
    "\x1b[31mFAIL\x1b[0m msr (1910 tests, 7 unexpected failures)\n"
    "\x1b[33mSKIP\x1b[0m msr (pykvm-qemu: -cpu max,vendor=AuthenticAMD: this host's CPU is GenuineIntel)\n"
    "TESTNAME=x TIMEOUT=90s ./x86/run x86/x.flat\n"
    "\x1b[31mFAIL\x1b[0m realmode (timeout; duration=90s)\n"
)


def test_the_runner_s_lines_are_read_with_their_reasons():
    results = kut.parse(RUNNER_OUTPUT)
    assert results["smptest"] == ("PASS", "1 tests") and results["vmexit_cpuid"] == ("PASS", "")
    assert results["realmode"] == ("FAIL", "timeout; duration=90s")
    assert results["msr"][0] == "SKIP"  # the last line of a name wins (one line per run of a test)
    assert kut.counts(results) == "2 passed, 1 failed, 1 skipped"


def test_without_a_checkout_it_skips_with_the_reason(capsys, monkeypatch):
    monkeypatch.delenv("KUT_DIR", raising=False)
    assert kut.main([]) == kut.SKIP_STATUS == 77
    assert "no kvm-unit-tests checkout" in capsys.readouterr().err
