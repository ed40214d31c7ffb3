"""Device models on the machine's port and MMIO bus."""
