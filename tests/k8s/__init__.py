"""A Kubernetes API for tests: kmock's emulator with real-server semantics, kubectl, clients."""
