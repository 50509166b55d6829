"""The one training engine: runtime (device, precision, threads, RNG, process group), data, losses, loop."""
