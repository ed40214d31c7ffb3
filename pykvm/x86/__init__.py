"""x86 guest set-up: named layout, descriptor tables, page tables, and CPU mode set-up."""
