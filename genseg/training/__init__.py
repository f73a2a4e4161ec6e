"""Training: one shared loop skeleton (loop.py) with the segmentation and diffusion steps plugged in."""
