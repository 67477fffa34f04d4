"""iiot-bench: harness/ (run), load/, capacity/, gate/, report/, results/, cli/; see docs/architecture.md."""
