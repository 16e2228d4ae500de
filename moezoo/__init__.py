"""moezoo: a multimodal Mixture-of-Experts model zoo.

The library lives in six subpackages, each a folder at the repository root:
``moezoo.kernels`` (MoE compute as functions), ``moezoo.zoo`` (modules, registry, weights),
``moezoo.encoders``, ``moezoo.pipelines``, ``moezoo.training`` and ``moezoo.app``.
"""

__version__ = "0.1.0"
