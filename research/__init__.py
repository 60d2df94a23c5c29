"""Research tools: measurements behind the profiles' choices, not part of the ECG-R1 product
(see research/README.md)."""
