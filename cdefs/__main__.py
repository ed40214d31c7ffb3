"""``python -m pykvm.cdefs FILE``: write the pre-parsed ``pykvm._kvm_cffi`` module to FILE."""

import sys

from . import MODULE_NAME, write_module

if len(sys.argv) != 2:
    sys.exit(f"usage: python -m pykvm.cdefs FILE   (writes the pre-parsed {MODULE_NAME} module to FILE)")
write_module(sys.argv[1])
