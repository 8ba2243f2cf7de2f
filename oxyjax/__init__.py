"""oxyjax: a JAX implementation of OxygenREC, an instruction-following generative recommender."""

__version__ = "0.1.0"
