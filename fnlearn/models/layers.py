"""Layers the zoo builds on. The conv and pool here are the ones every model uses,
so a faster lowering (chosen by backend in `fnlearn.ops`) reaches the whole zoo."""
import flax.linen as nn

Conv = nn.Conv
max_pool = nn.max_pool
