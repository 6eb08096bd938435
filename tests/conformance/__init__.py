"""Cross-backend conformance: strategies, tolerances, op checks and the cell runner."""
