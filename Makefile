# Makefile - developer entry points for pykvm.

.PHONY: guests
guests:
	$(MAKE) -C guests
