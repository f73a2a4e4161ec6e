"""genseg: generate synthetic brain-MRI slices with a diffusion model and segment tumours with a U-Net."""

__version__ = "0.1.0"
