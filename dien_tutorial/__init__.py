"""DIEN, the Deep Interest Evolution Network (Zhou et al., AAAI 2019), in PyTorch.

The support package of the DIEN book. One module per idea:

- :mod:`dien_tutorial.data`: behaviour logs (Amazon reviews, CSV, a simulator)
  and the DIEN sample builder.

Importing the package does nothing else: no downloads, no seeding.
"""

__version__ = "0.1.0"
