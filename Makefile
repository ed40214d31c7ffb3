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

.PHONY: system-deps setup guests run test test-amd bench clean

system-deps:
	@PYTHON=$(PYTHON) scripts/system-deps $(DEPS_PROFILE)

$(STAMP): pyproject.toml | system-deps
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

# make test-amd: the KVM tests on a real kvm_amd (Debian's 6.1 kernel under QEMU TCG, scripts/refhost;
# as root it installs qemu-system-x86, busybox-static, linux-image-amd64). Three reference-host runs,
# about 5 minutes on 2 cores, at most 22. Not yet part of CI: gdb breakpoints and single-step fail
# there (QEMU 7.2's SVM emulation) and tests/test_leaks.py soft-locks the guest kernel (left out).
AMD_PYTEST = $(PY) -m pytest -q -m kvm -p no:cacheprovider -rfEs
AMD_LATER = tests/test_nested_pykvm.py tests/test_cli.py tests/test_plugin.py
AMD_DEBUG = tests/test_gdbstub.py tests/test_trace.py
test-amd: setup guests
	scripts/refhost --setup
	@st=0; \
	scripts/refhost --times --timeout 420 -- $(AMD_PYTEST) tests --ignore=tests/test_leaks.py \
	  $(addprefix --ignore=,$(AMD_LATER) $(AMD_DEBUG)) || st=1; \
	scripts/refhost --times --timeout 600 -- $(AMD_PYTEST) $(AMD_LATER) || st=1; \
	scripts/refhost --times --timeout 300 -- $(AMD_PYTEST) $(AMD_DEBUG) || st=1; \
	exit $$st

bench: setup guests
	$(PY) scripts/bench_exits.py

clean:
	$(MAKE) -C guests clean
	rm -rf $(VENV) *.egg-info
