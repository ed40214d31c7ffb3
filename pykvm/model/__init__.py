"""Models of what the virtualization hardware does, in pure Python (no /dev/kvm needed).

Submodules are imported on demand (``from pykvm.model import vmcs``); this package imports none
of them eagerly.
"""
