"""pykvm's pytest plugin (pykvm/testing.py), tested the way its users meet it: test files run by
pytest's own ``pytester``. Guests are built with the system toolchain and run under /dev/kvm;
the tests that only need a missing /dev/kvm point the plugin at a device that does not exist."""

from __future__ import annotations

import re
import stat
from importlib.metadata import entry_points
from pathlib import Path

import pytest

# Imported here, before any inner run: pytester drops the modules an inner run imported when it
# ends, and a later import would make a second pykvm.vm whose Vm class the monkeypatches miss.
from pykvm import system, vm
from pykvm.outcome import GuestFailure
from pykvm.testing import GuestImage, _parse_deps, cap_from_name, format_failure
from pykvm.constants import Cap

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
needs_gcc = pytest.mark.skipif(not all(map(__import__("shutil").which, ("gcc", "ld", "objcopy"))),
                               reason="needs gcc, ld and objcopy to build guests (apt-get install build-essential)")


def plugin_args() -> list[str]:
    """How an inner run turns the plugin on: by its entry point's name where pykvm is installed
    with one (whatever that name is), else by module."""
    for ep in entry_points(group="pytest11"):
        if ep.value == "pykvm.testing":
            return ["-p", ep.name]
    return ["-p", "pykvm.testing"]


#: For every inner run: other plugins off (hypothesis alone would re-import itself in each, as
#: pytester drops what an inner run imported: a second each time), and no warning that the plugin,
#: imported by this outer run already, cannot be assertion-rewritten in the inner one.
INNER_ARGS = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:randomly",
              "-W", "ignore::pytest.PytestAssertRewriteWarning"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*plugin_args(), *INNER_ARGS, *args)


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the first line of ``path`` containing ``text``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def no_kvm(monkeypatch, tmp_path):
    """A host without KVM: pykvm opens pykvm.system.KVM_PATH when it is asked, so point it nowhere."""
    missing = tmp_path / "no-such-kvm"
    monkeypatch.setattr(system, "KVM_PATH", str(missing))
    return missing


# ---- no KVM needed ----------------------------------------------------------------------------------------

def test_failure_format_takes_the_file_from_the_message_or_the_image():
    failure = GuestFailure(12, 2, "tests/test_x.py: assertion failed: n == 3")
    assert format_failure(failure) == "guest FAIL at tests/test_x.py:12: assertion failed: n == 3 (value 0x2)"
    image = GuestImage(b"\x90", mode="long", load=0x100000, entry=0x100000, sources=["boot.S"])
    assert format_failure(GuestFailure(40, 0x2a, "no NX"), image) == "guest FAIL at boot.S:40: no NX (value 0x2a)"
    assert format_failure(GuestFailure(7, 0, "")) == "guest FAIL at line 7: (no message) (value 0x0)"


def test_guest_image_is_bytes_that_knows_how_it_was_built():
    image = GuestImage(b"\xf4", mode="real", load=0x1000, entry=0x1000, sources=["t.S"])
    assert image == b"\xf4" and isinstance(image, bytes)
    assert image.mode.value == "real" and image.symbols == {}
    assert repr(image) == "<GuestImage real mode, 1 bytes at 0x1000, entry 0x1000 from t.S>"


def test_capability_names():
    assert cap_from_name("SPLIT_IRQCHIP") is Cap.SPLIT_IRQCHIP
    assert cap_from_name("KVM_CAP_split_irqchip") is Cap.SPLIT_IRQCHIP
    assert cap_from_name(int(Cap.IRQCHIP)) is Cap.IRQCHIP
    assert cap_from_name(100000) == 100000
    with pytest.raises(ValueError, match="unknown KVM capability 'NO_SUCH_CAP'"):
        cap_from_name("NO_SUCH_CAP")


def test_dependency_files_are_parsed_with_continuations():
    text = "x.o: /tmp/a\\ b.S \\\n /usr/include/pykvm.h \\\n boot.h\n"
    assert _parse_deps(text) == ["/tmp/a b.S", "/usr/include/pykvm.h", "boot.h"]


def test_markers_and_option_are_registered(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_cap("IRQCHIP")
        @pytest.mark.kvm
        def test_nothing():
            pass
    """)
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.kvm: runs a real guest*", "@pytest.mark.kvm_cap(*names): *"])
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["*--kvm-required*fail, instead of skipping*"])


def test_plugin_named_twice_is_registered_once(pytester):
    """A conftest's pytest_plugins, -p and the entry point may all name the plugin: it loads once
    (true because the entry point is named after the module; pytest would refuse otherwise)."""
    pytester.makeconftest('pytest_plugins = ["pykvm.testing"]')
    pytester.makepyfile("def test_ok(kvm_backend):\n    pass\n")
    result = pytester.runpytest("-p", "pykvm.testing", *INNER_ARGS)
    result.assert_outcomes(passed=1)


# ---- the skip where KVM is absent, and --kvm-required ---------------------------------------------------

KVM_TESTS = """
    import pytest

    @pytest.mark.kvm
    def test_marked():
        pass

    def test_uses_a_machine(kvm_machine):
        kvm_machine()

    def test_runs_a_guest(run_guest):
        run_guest(b"\\xf4")

    def test_needs_nothing():
        pass
"""


def test_skip_when_kvm_is_absent(pytester, no_kvm):
    pytester.makepyfile(KVM_TESTS)
    result = run(pytester, "-rs")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines([
        f"pykvm: no KVM here (needs /dev/kvm: {no_kvm} does not exist: this host has no KVM*); "
        "tests that need it skip",
        f"SKIPPED [[]3[]] *needs /dev/kvm: {no_kvm} does not exist: this host has no KVM. Enable VT-x/AMD-V*",
    ])


def test_kvm_required_turns_the_skip_into_a_failure(pytester, no_kvm):
    pytester.makepyfile(KVM_TESTS)
    result = run(pytester, "--kvm-required")
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines([
        f"*needs /dev/kvm: {no_kvm} does not exist*(--kvm-required: this runner must be able to run KVM guests)",
    ])
    assert result.ret == 1


def test_kvm_required_from_the_ini_file(pytester, no_kvm):
    pytester.makeini("[pytest]\nkvm_required = true\n")
    pytester.makepyfile(KVM_TESTS)
    run(pytester).assert_outcomes(passed=1, errors=3)


@pytest.mark.kvm
def test_kvm_backend_fails_the_kvm_tests_on_another_backend(pytester, backend):
    """--kvm-backend=X: the KVM tests run where X serves /dev/kvm, and fail (naming the real one)
    where another does; tests that need no KVM are untouched."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm
        def test_marked():
            pass

        def test_uses_a_machine(kvm_machine):
            kvm_machine()

        def test_needs_nothing():
            pass
    """)
    run(pytester, f"--kvm-backend={backend}").assert_outcomes(passed=3)
    other = "kvm_intel" if backend != "kvm_intel" else "kvm_amd"
    result = run(pytester, f"--kvm-backend={other}")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([f"*--kvm-backend={other}: /dev/kvm is served by {backend}*"])


def test_missing_toolchain_skips_or_fails(pytester, monkeypatch):
    monkeypatch.setenv("PYKVM_CC", "/nonexistent/gcc")
    pytester.makepyfile("""
        def test_build(guest_asm):
            guest_asm("hlt")
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*building guests needs /nonexistent/gcc: install gcc and binutils*"])
    run(pytester, "--kvm-required").assert_outcomes(failed=1)


# ---- guests: passing, failing with the guest's message, not building ------------------------------------


@pytest.mark.kvm
@needs_gcc
def test_passing_guests_in_asm_and_c(pytester):
    pytester.makepyfile(r'''
        import pytest

        def test_asm(guest_asm, run_guest):
            result = run_guest(guest_asm("""
                PYKVM_PUTC 'o'
                PYKVM_PUTC 'k'
            """))
            assert result.ok and result.console == b"ok" and result.exits == 3

        def test_c(guest_c, run_guest):
            result = run_guest(guest_c("""
                static int square(int x) { return x * x; }
                int main(void)
                {
                    PYKVM_ASSERT(square(7) == 49, square(7));
                    pykvm_sync(square(3));
                    return 0;
                }
            """))
            assert result.syncs == (9,)

        @pytest.mark.parametrize("mode", ["real", "protected", "long"])
        def test_every_mode(guest_asm, run_guest, mode):
            image = guest_asm("PYKVM_PUTC 'm'", mode=mode)
            assert image.mode.value == mode
            assert run_guest(image).console == b"m"
    ''')
    run(pytester, "--strict-markers").assert_outcomes(passed=5)


@pytest.mark.kvm
@needs_gcc
def test_guest_assertion_fails_with_its_message(pytester):
    test = pytester.makepyfile(test_assert=r'''
        def test_square(guest_c, run_guest):
            run_guest(guest_c(r"""
                int main(void)
                {
                    int n = 2;
                    pykvm_puts("checking n\n");
                    PYKVM_ASSERT(n == 3, n);
                    return 0;
                }
            """))
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=1)
    line = line_of(test, "PYKVM_ASSERT")
    result.stdout.fnmatch_lines([
        "*_ test_square _*",
        f"guest FAIL at test_assert.py:{line}: assertion failed: n == 3 (value 0x2)",
        "*- Captured guest console call -*",
        "checking n",
        f"FAILED test_assert.py::test_square - Failed: guest FAIL at test_assert.py:{line}: *",
    ])
    assert "Traceback" not in result.stdout.str() and "testing.py" not in result.stdout.str()


@pytest.mark.kvm
@needs_gcc
def test_asm_fail_points_at_the_snippet_line(pytester):
    test = pytester.makepyfile(test_asmfail=r'''
        def test_fail(guest_asm, run_guest):
            run_guest(guest_asm("""
                movl $41, %ecx
                incl %ecx
                PYKVM_FAIL __LINE__, 0x2a, message
                .section .rodata
            message: .asciz "the answer is not allowed"
            """, mode="protected"))
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=1)
    line = line_of(test, "PYKVM_FAIL")
    result.stdout.fnmatch_lines([f"guest FAIL at test_asmfail.py:{line}: the answer is not allowed (value 0x2a)"])


@pytest.mark.kvm
@needs_gcc
def test_other_guest_endings_fail_the_test_with_their_report(pytester):
    pytester.makepyfile(r'''
        def test_status(guest_c, run_guest):
            run_guest(guest_c("int main(void) { return 3; }"))

        def test_ud2(guest_asm, run_guest):
            run_guest(guest_asm("ud2"))

        def test_unchecked(guest_c, run_guest):
            result = run_guest(guest_c("int main(void) { PYKVM_ASSERT(0, 5); return 0; }"), check=False)
            assert result.status == 1 and result.failure.value == 5 and not result.ok
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines([
        "guest said DONE with status 3 (not 0; pykvm run would exit 3)*",
        "GuestException (pykvm run would exit 72): guest exception #UD (vector 6) at rip=0x100000*",
        "mode: long (64-bit code)",
        "code at 0x*",
    ])
    assert "Traceback" not in result.stdout.str()


@needs_gcc
def test_snippet_that_does_not_assemble_fails_with_the_error_line(pytester):
    test = pytester.makepyfile(test_bad='''
        def test_bad(guest_asm):
            guest_asm("""
                movl $1, %eax
                movx $1, %eax
            """)
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=1)
    line = line_of(test, "movx")
    result.stdout.fnmatch_lines([
        "guest_asm: test_bad.py does not assemble (gcc exited with status 1):",
        f"test_bad.py:{line}: Error: no such instruction: `movx $1,%eax'",
    ])
    out = result.stdout.str()
    assert "Traceback" not in out and "During handling" not in out and "pykvm-build-" not in out


@needs_gcc
def test_c_that_does_not_compile_fails_with_the_compiler_lines(pytester):
    test = pytester.makepyfile(test_badc='''
        def test_bad(guest_c):
            guest_c("""
                int main(void)
                {
                    return undeclared;
                }
            """)
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=1)
    line = line_of(test, "undeclared;")
    result.stdout.fnmatch_lines([
        "guest_c: test_badc.py does not compile (gcc exited with status 1):",
        f"test_badc.py:{line}:*: error: *undeclared* undeclared *",
        "*return undeclared;",  # gcc quotes the line from the test file itself
    ])


@needs_gcc
def test_c_without_main_and_c_in_real_mode_say_what_is_wrong(pytester):
    pytester.makepyfile('''
        def test_no_main(guest_c):
            guest_c("int helper(void) { return 1; }")

        def test_real_mode(guest_c):
            guest_c("int main(void) { return 0; }", mode="real")
    ''')
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*does not link*a C guest without _start is entered at int main(void)*",
        "*undefined reference to `main'*",
        "*freestanding C needs protected, paged, pae or long mode*",
    ])


@needs_gcc
def test_compiler_warnings_become_pytest_warnings_at_the_test_line(pytester):
    test = pytester.makepyfile(test_warn='''
        def test_warn(guest_c):
            image = guest_c("""
                int main(void) { int unused; return 0; }
            """)
    ''')
    result = run(pytester)
    result.assert_outcomes(passed=1, warnings=1)
    line = line_of(test, "image = guest_c")
    result.stdout.fnmatch_lines([f"*test_warn.py:{line}: GuestBuildWarning*", "*unused variable*"])


# ---- the build cache ------------------------------------------------------------------------------------------

@pytest.fixture
def counting_gcc(tmp_path, monkeypatch):
    """$PYKVM_CC: gcc that logs each invocation; ``counting_gcc()`` -> how many compiled (-c)."""
    log = tmp_path / "gcc.log"
    wrapper = tmp_path / "counting-gcc"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec gcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PYKVM_CC", str(wrapper))

    def compiles() -> int:
        if not log.exists():
            return 0
        return sum(" -c " in f" {line} " for line in log.read_text().splitlines())

    return compiles


CACHED_TESTS = r'''
    def test_asm(guest_asm):
        assert guest_asm("PYKVM_PUTC 'a'")

    def test_c(guest_c):
        image = guest_c("""
            #include "mine.h"
            int main(void) { return MINE; }
        """)
        assert image.entry == 0x100000
'''


@needs_gcc
def test_second_build_comes_from_the_cache(pytester, counting_gcc):
    pytester.makepyfile(CACHED_TESTS)
    header = pytester.path / "mine.h"
    header.write_text("#define MINE 0\n")
    run(pytester).assert_outcomes(passed=2)
    first = counting_gcc()
    assert first == 3  # the asm snippet, the C snippet, and the start stub C guests get
    assert list((pytester.path / ".pytest_cache" / "d" / "pykvm-guests").glob("*.json"))

    run(pytester).assert_outcomes(passed=2)
    assert counting_gcc() == first  # nothing compiled the second time

    header.write_text("#define MINE 1\n")  # a header the snippet includes (found next to the test)
    run(pytester).assert_outcomes(passed=2)
    assert counting_gcc() == first + 2  # only the C guest again (and its start stub)

    run(pytester, "--cache-clear").assert_outcomes(passed=2)
    assert counting_gcc() == first + 5


# ---- markers: kvm_cap, and modes the backend cannot run --------------------------------------------------

@pytest.mark.kvm
def test_kvm_cap_skips_naming_the_capability_and_the_backend(pytester, monkeypatch):
    from pykvm import testing

    real = vm.Vm.check_extension
    monkeypatch.setattr(vm.Vm, "check_extension",
                        lambda self, cap: 0 if cap == Cap.SPLIT_IRQCHIP else real(self, cap))
    monkeypatch.setattr(testing, "_host_kvm_backend", lambda: "kvm_test")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_cap("SPLIT_IRQCHIP")
        def test_split():
            pass

        @pytest.mark.kvm_cap("KVM_CAP_USER_MEMORY", "IRQCHIP")
        def test_present():
            pass

        @pytest.mark.kvm_cap("NO_SUCH_CAP")
        def test_typo():
            pass
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(passed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.kvm_cap: unknown KVM capability 'NO_SUCH_CAP'*",
        "SKIPPED [[]1[]] *needs KVM_CAP_SPLIT_IRQCHIP, which this host's KVM (kvm_test) does not offer",
    ])
    result = run(pytester, "--kvm-required")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*needs KVM_CAP_SPLIT_IRQCHIP, which this host's KVM (kvm_test) does not offer "
                                 "(--kvm-required: *"])


@pytest.mark.kvm
def test_a_mode_the_backend_refuses_is_a_skip(pytester, monkeypatch):
    from pykvm.ioctl import KvmUnsupportedError
    from pykvm.machine import Machine

    def refuse(self, mode, entry, la57=False):
        raise KvmUnsupportedError(f"kvm_test cannot run {mode.value} mode: it refused cr0=0x80000011")

    monkeypatch.setattr(Machine, "setup", refuse)
    pytester.makepyfile("""
        def test_paged(kvm_machine):
            kvm_machine("paged")
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*kvm_test cannot run paged mode: it refused cr0=0x80000011"])
    run(pytester, "--kvm-required").assert_outcomes(failed=1)


# ---- machines, exits, symbols ---------------------------------------------------------------------------

@pytest.mark.kvm
@needs_gcc
def test_kvm_machine_and_expect_exit(pytester):
    pytester.makepyfile(r'''
        from pykvm import exits
        from pykvm.machine import Machine
        from pykvm.testing import expect_exit

        POST = """
            outb %al, $0x80
            PYKVM_PUTC 'x'
        """

        def test_steps(kvm_machine, guest_asm):
            m = kvm_machine(image=guest_asm(POST, mode="real"))
            assert isinstance(m, Machine)
            exit = expect_exit(m, exits.IoOut, port=0x80, size=1)
            expect_exit(m, "IoOut", port=0xE9, data=b"x", value=lambda v: v == ord("x"))
            expect_exit(m, exits.IoOut, port=0xEA)  # the DONE call

        def test_wrong_data(kvm_machine, guest_asm):
            m = kvm_machine(image=guest_asm(POST))
            expect_exit(m, exits.IoOut, port=0x80)
            expect_exit(m, exits.IoOut, port=0xE9, data=b"y")

        def test_wrong_kind(kvm_machine, guest_asm):
            expect_exit(kvm_machine(image=guest_asm(POST)), exits.MmioWrite)

        def test_bare_machine_in_a_mode(kvm_machine, run_guest):
            m = kvm_machine("protected", mem=2 << 20)
            m.load(bytes.fromhex("b8 01 00 00 00 bb 07 00 00 00 66 ba ea 00 ef"), 0x100000)  # DONE(7)
            assert run_guest(m, check=False).status == 7
    ''')
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "expected IoOut(port=0xe9, data=b'y'), but data is b'x': IoOut(port=0xe9, *",
        "mode: long (64-bit code)",
        "expected MmioWrite(), but the next exit is a IoOut: IoOut(port=0x80*",
    ])


@pytest.mark.kvm
@needs_gcc
def test_images_carry_symbols_and_link_files(pytester):
    pytester.makefile(".c", helper="int twice(int x) { return 2 * x; }\nint counter = 5;\n")
    pytester.makepyfile(test_link=r'''
        from pathlib import Path

        HERE = Path(__file__).parent

        def test_link(guest_c, run_guest):
            image = guest_c("""
                int twice(int);
                extern int counter;
                int main(void) { counter = twice(21); return 0; }
            """, mode="pae", link=[HERE / "helper.c"])
            assert image.sources == ("test_link.py", "helper.c")
            assert image.symbols["counter"] > image.load and "twice" in image.symbols

        def test_run(guest_c, run_guest):
            image = guest_c("""
                int twice(int);
                extern int counter;
                int main(void) { counter = twice(21); return 0; }
            """, link=[HERE / "helper.c"])
            result = run_guest(image)
            assert result.machine.memory.read_u32(image.symbols["counter"]) == 42

        def test_build_files(guest_build):
            (HERE / "start.S").write_text(
                '#include "pykvm.h"\n.code64\n.section .text.entry, "ax"\n.globl _start\n_start: PYKVM_DONE 0\n')
            image = guest_build(HERE / "start.S", HERE / "helper.c", load=0x200000)
            assert image.load == image.entry == 0x200000 and image.symbols["counter"] > 0x200000
    ''')
    result = run(pytester, "test_link.py")
    result.assert_outcomes(passed=3)


# ---- scaling out: pytest-xdist, and the worked example ------------------------------------------------------

@pytest.mark.kvm
@needs_gcc
def test_guests_under_xdist_each_worker_with_its_own_vms(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(r'''
        import os
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_guest(guest_c, run_guest, n):
            result = run_guest(guest_c("""
                int main(void) { pykvm_sync(N * N); return 0; }
            """, flags=[f"-DN={n}"]))
            assert result.syncs == (n * n,)
            print("worker", os.environ.get("PYTEST_XDIST_WORKER"))
    ''')
    result = pytester.runpytest_subprocess(*plugin_args(), *INNER_ARGS, "-p", "xdist", "-n", "2", "-rP")
    result.assert_outcomes(passed=8)
    assert {"worker gw0", "worker gw1"} <= set(re.findall(r"worker gw\d", result.stdout.str()))


def test_the_worked_example_passes(pytester):
    """`pytest examples/` as its README says (the example turns the plugin on in its conftest)."""
    result = pytester.runpytest_subprocess(str(ROOT / "examples"), "-o", f"cache_dir={pytester.path / 'cache'}",
                                           "-rs", *INNER_ARGS)
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes.get("passed", 0) + outcomes.get("skipped", 0) >= 17 and "failed" not in outcomes


@pytest.mark.kvm
def test_kvm_reset_machine_is_built_once_and_reset_for_each_test(pytester):
    """Three tests ask for the same guest: one machine, reset between them (each starts at the
    entry with the memory of the checkpoint, its port handler registered again without a clash)."""
    from pykvm.images import guest_image

    pytester.makepyfile(f"""
        IMAGE = open({str(guest_image("counter"))!r}, "rb").read()
        seen = []

        def _use(kvm_reset_machine):
            m = kvm_reset_machine(IMAGE)
            seen.append(id(m))
            assert m.vcpu.get_regs().rip == 0x100000
            assert m.memory.read(0x200008, 8) == bytes(8)  # round 1 of the last test wrote here: gone
            m.on_port(0x7FF, lambda exit, vcpu: None)
            assert m.run(timeout=60).ok
            assert m.console_output.startswith(b"count 00000001") and m.console_output.endswith(b"count 000000c8\\n")

        def test_a(kvm_reset_machine):
            _use(kvm_reset_machine)

        def test_b(kvm_reset_machine):
            _use(kvm_reset_machine)

        def test_c(kvm_reset_machine):
            _use(kvm_reset_machine)

        def test_one_machine():
            assert len(seen) == 3 and len(set(seen)) == 1
    """)
    run(pytester, "-p", "no:randomly").assert_outcomes(passed=4)
