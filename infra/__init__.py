"""Infrastructure every package shares: the strict base of all configuration sections, the cache
directory, and the base model (resolving a model spec, converting the packaged default to safetensors).

It imports nothing from `selection`, `adapters` or `serving`; they all import it.
"""
