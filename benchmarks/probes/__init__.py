"""Feasibility probes: scripts that measure a technique before the compiler adopts it."""
