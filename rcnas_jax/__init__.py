"""rcnas_jax: reinforced compressive neural architecture search for adversarial robustness."""

__version__ = "0.1.0"
