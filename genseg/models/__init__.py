"""Models: the segmentation U-Net and the diffusion UNet factory. No file reading, no CLI parsing."""
