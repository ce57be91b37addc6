"""Hostile-input tooling users run by hand (not in CI): `python -m bridge.fuzz`.

It sits above the data path it drives (the Bridge's plain receive path and the secure
endpoints), so nothing below imports it: `modes.py` (every mode, the command line) and
`plain.py` (the plain mode's Bridge harness and the mutations all modes share).
"""
