"""Scheduling: decisions about which work becomes one kernel, made on the lowered kernel list."""
