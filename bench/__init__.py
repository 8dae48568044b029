"""pgolf benchmarks: commands that print side-by-side ratios (never part of the test suite)."""
