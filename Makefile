# Makefile - developer entry points for pykvm.
#
#   make run     install the system packages it needs, set up (virtualenv + pykvm + test deps),
#                build the guests, run the default guest
#   make test    install every system package the suite uses, set up, build the guests, run the
#                whole test suite
#   make guests  build guests/*.S into guests/build/ (flat .bin and .elf)
#   make bench   the exit-cost benchmark (Python vs C)
#
# "Install the system packages" is scripts/system-deps (the `system-deps` target below, which the
# others call first): profile `run` (python3-venv, make, gcc, binutils) for run, guests, setup and
# bench, profile `test` (README.md, "Requirements") for test. It looks for each package's
# commands or files and, for the missing ones, runs apt-get as root; as any other user it prints
# the apt-get command to run instead, and the build goes on (tests that need a missing package skip).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEPS_PROFILE = run
test: DEPS_PROFILE = test

.PHONY: test-linux test-outside test-kut system-deps setup guests run test test-amd test-intel repro-amd bench clean

system-deps:
	@PYTHON=$(PYTHON) scripts/system-deps $(DEPS_PROFILE)

$(STAMP): pyproject.toml setup.py | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

guests: system-deps
	$(MAKE) -C guests

run: system-deps setup guests
	$(VENV)/bin/pykvm run

test: system-deps setup guests
	$(PY) -m pytest

# make test-amd: the KVM tests on a real kvm_amd: Debian's 6.1 kernel under QEMU TCG (scripts/refhost;
# as root it installs qemu-system-x86, busybox-static, linux-image-amd64 and fetches QEMU 10 from
# bookworm-backports into ~/.cache/pykvm-refhost). One reference-host run, one pytest: about 21
# minutes on 2 cores (the whole tier about 25); at most AMD_BUDGET seconds (then it fails), each
# test at most 300 s. Then a second boot with kvm_amd nested=0 checks the probe's verdict and the
# fix it prints, and a third boots Debian's kernel under pykvm boot inside it
# (tests/test_boot_linux.py, the slow tests: the full boot to power-off, a marker written through
# virtio-blk and read back by a second boot), at most AMD_LINUX_BUDGET seconds. A reference host whose own kernel panics (seen once in CI:
# Debian's 6.1 under QEMU 10.0 TCG, a stack overflow in its entry code while an L2 Linux ran) is
# booted once more within the same budget (--retry-panic 1); the retry is said on stderr.
# Where it cannot run (no QEMU or kernel and not root) it says so and skips. A test that runs past
# 240 s has every thread's stack printed (faulthandler_timeout) and goes on; at 300 s it fails.
AMD_BUDGET = 2100
AMD_LINUX_BUDGET = 900
AMD_PYTEST = $(PY) -m pytest -q -m kvm -p no:cacheprovider -rfEs --timeout 300 -o faulthandler_timeout=240 \
	--kvm-required --kvm-backend=kvm_amd
test-amd: setup guests
	@scripts/refhost --setup || true
	@if scripts/refhost --check >/dev/null; then \
	  scripts/refhost --times --retry-panic 1 --timeout $(AMD_BUDGET) -- $(AMD_PYTEST) tests && \
	  scripts/refhost --times --retry-panic 1 --timeout 300 --kvm-amd nested=0 -- $(AMD_PYTEST) \
	    tests/test_probe_kvm.py -k verdict_on_this_host && \
	  scripts/refhost --times --retry-panic 1 --timeout $(AMD_LINUX_BUDGET) -- $(AMD_PYTEST) --slow tests/test_boot_linux.py; \
	else \
	  echo "make test-amd: SKIPPED: the kvm_amd reference host cannot run here:"; scripts/refhost --check; \
	fi

# make test-intel: a real kvm_intel under Bochs (scripts/refhost-intel; Debian's 6.1 kernel, Bochs's
# Skylake-X VMX model): pykvm probe, pykvm run and tests/test_guests.py inside, about 3.5 minutes.
# test_runaway_guest_is_stopped_by_the_timeout is left out: its `jmp .` guest never gives the
# emulated host back its timer (Bochs), so nothing can stop it but the outer time limit; and
# test_device_without_permission, which needs util-linux's setpriv (the userland there is busybox).
test-intel: setup guests
	@if scripts/refhost-intel --check >/dev/null; then \
	  scripts/refhost-intel --times --timeout 600 -- sh -c '$(PY) -m pykvm probe && $(PY) -m pykvm run && \
	    $(PY) -m pytest -q -m kvm -p no:cacheprovider -rfEs --timeout 300 --kvm-required \
	    --kvm-backend=kvm_intel -k "not runaway and not without_permission" tests/test_guests.py tests/test_probe_kvm.py'; \
	else \
	  echo "make test-intel: SKIPPED: the kvm_intel reference host cannot run here:"; scripts/refhost-intel --check; \
	fi

# make test-outside: kernels from Debian's packages started with QEMU's command line (the Xen
# hypervisor, scripts/outside_kernels.py) under pykvm-qemu and under QEMU's TCG: about 30 s.
test-outside: setup guests
	$(PY) scripts/outside_kernels.py --setup
	PYKVM_OUTSIDE_REQUIRED=1 $(PY) -m pytest -q -rs -p no:cacheprovider --kvm-required tests/test_outside_kernels.py

# make test-linux: a distribution kernel (Debian's linux-image-amd64, scripts/system-deps linux) under
# `pykvm boot` (tests/test_boot_linux.py, marked slow). On kvm_pvm the early boot: the command line and
# e820 map the kernel echoes from pykvm's zero page, as far as it gets in 4 minutes (about 5 minutes
# in all); on a hardware-style KVM the full boot through pykvm's initramfs to power-off.
test-linux: setup guests
	@PYTHON=$(PYTHON) scripts/system-deps linux
	$(PY) -m pytest -q -rs -p no:cacheprovider --slow --kvm-required tests/test_boot_linux.py

# make test-kut KUT_DIR=~/src/kvm-unit-tests: kvm-unit-tests' own runner under QEMU (KVM) and
# under pykvm-qemu, side by side (scripts/kvm_unit_tests.py; public only as source: skips without it).
test-kut: setup
	$(PY) scripts/kvm_unit_tests.py $(if $(KUT_DIR),--kut $(KUT_DIR))

# make repro-amd: scripts/guest_debug_repro.c (KVM guest debugging, no pykvm) here and inside the
# reference host, in real mode, 64-bit CPL0 and CPL3; prints what each KVM does.
repro-amd: build/guest_debug_repro
	-build/guest_debug_repro long
	scripts/refhost --timeout 300 -- sh -c 'for m in real long user; do build/guest_debug_repro $$m; done'

build/guest_debug_repro: scripts/guest_debug_repro.c
	@mkdir -p build
	gcc -O2 -Wall -static -o $@ $<

bench: setup guests
	$(PY) scripts/bench_exits.py

clean:
	$(MAKE) -C guests clean
	rm -rf $(VENV) *.egg-info
