"""The dataset pass for LDM data: CLIP embeddings, CLIP score and head scores of every sample of LAION-style
shards (``embed``), near-duplicate groups (``dedup``), and filtered re-sharding (``filter``).

A feature package like ``conditioning`` and ``search``: it uses ``data``, ``registry`` and everything below
them, and no other feature package.
"""
