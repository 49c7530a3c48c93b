"""Ops with custom gradients and backend-chosen lowerings. Imports no model."""
from fnlearn.ops.activations import gelu
from fnlearn.ops.conv import conv_general_dilated
from fnlearn.ops.custom import relu
from fnlearn.ops.pool import max_pool
