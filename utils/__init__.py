"""What every layer needs at run time: the error type, atomic I/O and safe loading, logs, device choice, torchrun
processes."""
