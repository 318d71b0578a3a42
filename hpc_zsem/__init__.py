"""hpc_zsem: zero-shot enhancement of noisy EM images with probabilistic generative models.

The package learns a generative model (SSSC trained with evolutionary truncated posteriors, or a
Gamma-Poisson mixture) of the overlapping patches of one noisy image, then merges the posterior-predictive
estimates of all patches that cover a pixel into a mean (denoised) and a variance image.
"""

__version__ = "0.1.0"
