"""The GPU broker's host drivers: PCI sysfs, NVML, and a faithful fake host for tests."""
