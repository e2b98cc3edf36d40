"""qemu-iotests style golden-transcript tests for qimg (see README.md)."""
