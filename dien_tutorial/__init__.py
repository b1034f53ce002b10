"""DIEN, the Deep Interest Evolution Network (Zhou et al., AAAI 2019), in PyTorch.

The support package of the DIEN book. One module per idea, in reading order:

- :mod:`dien_tutorial.data`: behaviour logs (Amazon reviews, CSV, a
  simulator) and the DIEN sample builder.
- :mod:`dien_tutorial.config`: the model's widths and switches, with presets.
- :mod:`dien_tutorial.layers`: the GRU cell, attention, the interest
  extractor, the auxiliary loss, the interest evolving layer, Dice and the MLP.
- :mod:`dien_tutorial.model`: DIEN and its baselines built from those layers.
- :mod:`dien_tutorial.train`: ``fit``, ``evaluate``, metrics, checkpoints.
- :mod:`dien_tutorial.din_step`: DIN's training step with the chain rule
  written out, which ``train_step`` uses for DIN (faster than autograd).
- :mod:`dien_tutorial.export`: ONNX export with a dynamic sequence length.
- :mod:`dien_tutorial.cli`: ``python -m dien_tutorial data|train|compare|export``.

Importing the package does nothing else: no downloads, no seeding.
"""

__version__ = "0.1.0"
