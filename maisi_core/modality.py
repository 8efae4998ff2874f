"""Intensity conventions of the modalities the engine writes: one home for each range.

CT is stored as 12-bit Hounsfield units in int16 (DICOM's usual CT range): the writer clips to it, the QC
flags values outside it, the phantom intensity model clips to it. An MR model (MAISI's rflow-mr) would
add its own convention here rather than reuse the HU names.
"""

from __future__ import annotations

CT_HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)  # stored CT values, HU (int16, 12-bit)
AIR_HU = -1000.0  # background and air, HU
