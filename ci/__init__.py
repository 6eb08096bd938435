"""CI entry points: `python -m ci.conformance` runs the cross-backend conformance matrix."""
