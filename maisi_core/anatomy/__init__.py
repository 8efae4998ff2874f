"""Anatomy and mask sources: MAISI labels, the procedural phantom and its body, the phantom intensity model, and the mask sources (phantom, user maps, folder, MAISI's mask generator)."""
