"""CRIS-style evaluation: predictions mapped back to the original image, IoU per sentence."""
