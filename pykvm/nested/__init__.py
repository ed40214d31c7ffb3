"""Reference platforms and helpers for VMX/SVM guest code on hosts without nested virtualization."""
