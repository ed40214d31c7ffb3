"""pykvm: a thin hypervisor driver in Python over /dev/kvm."""
