"""Evaluation: per-case QC (HU ranges, orientation, tumours, label agreement), feature extractors, Fréchet distance, diversity and memorisation, reference statistics."""
