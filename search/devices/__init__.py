"""Layer 4, devices: target files (what to compile for, how to time), RPC devices, locks."""
