"""diffusers pipelines over genseg's registered modules: sampling slices (and, on top, generate-then-segment)."""

from .diffusion import SamplingSettings, SliceDiffusionOutput, SliceDiffusionPipeline, load_diffusion, seed_generators

__all__ = ["SamplingSettings", "SliceDiffusionOutput", "SliceDiffusionPipeline", "load_diffusion", "seed_generators"]
