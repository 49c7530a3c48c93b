"""The fast CIFAR-10 net behind airbench94 (Keller Jordan, 2024), in Flax Linen.

A frozen 2x2 patch-whitening conv (24 channels) + GELU, three blocks of
conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (widths 64, 256, 256)
with identity-initialised convs and scale-free BatchNorm, a global max-pool, a
bias-free Dense to 10 classes, and logits times 1/9. NHWC throughout. airbench94_muon's
net (`FastNetMuon`) differs in its head (unit-std weights, logits times 1/256, the default
last width, whatever the widths) and in its whitening bias's init (PyTorch's default, not zero).

Parameter paths, for the optimizer's groups (the CIFAR recipe's `param_labels`):
  whiten/kernel            the whitening filters: set from training images by `with_whitening`
                           (the registry's `data_init` for this family), never trained
  whiten/bias              trained for the first epochs only in airbench
  block{1,2,3}/bn{1,2}/bias  BatchNorm biases: airbench gives them 64x the learning rate
  block{1,2,3}/conv{1,2}/kernel, fc/kernel   everything else (with Muon, the conv kernels are its group)
"""
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fnlearn import ops
from fnlearn.models import layers


def dirac_init(key, shape, dtype=jnp.float32):
    """airbench's conv init: torch default, then the first C_in filters set to the identity.

    The first C_in output channels pass their input channel through unchanged (centre
    tap 1, every other tap and channel 0), so at init each block starts close to an
    identity map plus fresh random features in the remaining outputs.

    Args:
      key: PRNG key for the random part.
      shape: (kh, kw, C_in, C_out) kernel shape, kh and kw odd.
      dtype: parameter dtype.
    Returns:
      (kh, kw, C_in, C_out) kernel.
    """
    kh, kw, c_in, c_out = shape
    kernel = layers.torch_kernel_init(key, shape, dtype)
    n = min(c_in, c_out)
    identity = jnp.zeros((kh, kw, c_in, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(c_in, n, dtype=dtype))
    return kernel.at[..., :n].set(identity)


def unit_std_init(key, shape, dtype=jnp.float32):
    """PyTorch's Linear init divided by its sample std: airbench94_muon's head, whose logits are
    then divided by 256 (the default last width) instead of airbench94's 9."""
    kernel = layers.torch_kernel_init(key, shape, dtype)
    return kernel / jnp.std(kernel, ddof=1)  # torch's Tensor.std() is the unbiased one


def image_patches(images, patch_size=2):
    """Every patch_size x patch_size patch of the images ('VALID', stride 1), flattened.

    Args:
      images: (N, H, W, C) normalised images.
      patch_size: side of the square patch.
    Returns:
      (N * (H - p + 1) * (W - p + 1), p * p * C) patches, flattened in (h, w, c) order
      so that a row reshapes to an HWI conv filter.
    """
    n, h, w, c = images.shape
    p = patch_size
    shifted = [images[:, i:h - p + 1 + i, j:w - p + 1 + j] for i in range(p) for j in range(p)]
    return jnp.stack(shifted, axis=3).reshape(-1, p * p * c)


def whitening_kernel(images, patch_size=2, eps=5e-4):
    """Conv filters that whiten image patches: eigenvectors / sqrt(eigenvalue + eps), and their negation.

    As airbench, the "covariance" is the uncentred second moment of the patches (the
    images are already normalised); filters are in decreasing eigenvalue order.
    A sample of the training set (airbench uses 5000 images) is enough.

    Args:
      images: (N, H, W, C) normalised training images.
      patch_size: side of the square conv kernel.
      eps: added to the eigenvalues so near-null directions are not blown up.
    Returns:
      (p, p, C, 2 * p * p * C) float32 kernel: filters k < p*p*C whiten, the rest are
      their negation (so GELU sees both signs of each whitened component).
    """
    x = image_patches(jnp.asarray(images, jnp.float32), patch_size)  # (M, p*p*C)
    # "highest": on GPUs the default float32 matmul may round inputs to TF32.
    cov = jnp.matmul(x.T, x, precision="highest") / x.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(cov)  # ascending; columns are vectors
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / jnp.sqrt(eigenvalues + eps)  # (p*p*C, p*p*C), one filter a column
    kernel = jnp.concatenate([filters, -filters], axis=1)
    return kernel.reshape(patch_size, patch_size, images.shape[-1], -1)


def with_whitening(variables, images, eps=5e-4):
    """Returns `variables` with `params/whiten/kernel` set from the images.

    Args:
      variables: FastNet variables from `init`.
      images: (N, H, W, 3) normalised training images (a sample of a few thousand).
      eps: see `whitening_kernel`.
    Returns:
      new variables; the input is left unchanged.
    """
    old = variables["params"]["whiten"]["kernel"]
    kernel = whitening_kernel(images, old.shape[0], eps).astype(old.dtype)
    params = {**variables["params"], "whiten": {**variables["params"]["whiten"], "kernel": kernel}}
    return {**variables, "params": params}


def init_fastnet(model, key, images, eps=5e-4):
    """Initialises a FastNet with its whitening stem set from the images.

    Args:
      model: a `FastNet`.
      key: PRNG key.
      images: (N, 32, 32, 3) normalised training images (a sample of a few thousand).
      eps: see `whitening_kernel`.
    Returns:
      variables {"params", "batch_stats"}.
    """
    return with_whitening(model.init(key, images[:1]), images, eps)


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU.

    Attributes:
      features: output channels of both convs.
      bn_momentum: flax BatchNorm momentum (weight of the old running statistics).
    """
    features: int
    bn_momentum: float = 0.6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Applies the block.

        Args:
          x: (B, H, W, C_in) activations.
          train: use batch statistics and update `batch_stats` when True.
        Returns:
          (B, H // 2, W // 2, features) activations.
        """
        conv = partial(layers.Conv, self.features, (3, 3), padding="SAME", use_bias=False,
                       kernel_init=dirac_init, dtype=self.dtype, param_dtype=self.param_dtype)
        # Scale-free BN (a following conv can absorb any scale), with airbench's eps 1e-12.
        norm = partial(layers.BatchNorm, momentum=self.bn_momentum, epsilon=1e-12, use_scale=False,
                       dtype=self.dtype, param_dtype=self.param_dtype)
        mode = {"use_running_average": not train}  # a call argument: see `train.freeze`
        x = conv(name="conv1")(x)
        x = layers.max_pool(x, (2, 2), strides=(2, 2))  # pool before BN: 4x less to normalise
        x = ops.gelu(norm(name="bn1")(x, **mode))
        x = ops.gelu(norm(name="bn2")(conv(name="conv2")(x), **mode))
        return x


class FastNet(nn.Module):
    """airbench94's CIFAR-10 net.

    Attributes:
      widths: output channels of the three blocks.
      num_classes: logits per example.
      patch_size: side of the whitening conv kernel; it has 2 * p * p * 3 channels.
      bn_momentum: flax BatchNorm momentum, the weight kept by the running statistics:
        0.6 is airbench's `batchnorm_momentum=0.6`, which it passes to torch as
        momentum=1-0.6 (running = 0.6 * running + 0.4 * batch).
      logit_scale: multiplies the logits (airbench's 1/9), a fixed temperature.
      head_init: the init of the Dense head's kernel.
      whiten_bias_init: the init of the whitening conv's bias (airbench94 zeroes it).
      remat: recompute each conv group's activations in the backward pass
        (`layers.remat_block`): less memory, one more forward pass.
      dtype: compute dtype of the blocks; the whitening stem and the head compute in float32
        (Keras's mixed-precision rule for numerically sensitive layers and the output: bf16
        keeps 8 bits, airbench's fp16 11); logits come out in float32.
      param_dtype: storage dtype of every parameter.
    """
    widths: Sequence[int] = (64, 256, 256)
    num_classes: int = 10
    patch_size: int = 2
    bn_momentum: float = 0.6
    logit_scale: float = 1 / 9
    head_init: Callable = layers.torch_kernel_init
    whiten_bias_init: Callable = nn.initializers.zeros
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Maps images to logits.

        Args:
          x: (B, H, W, 3) normalised images (32x32 for CIFAR).
          train: use batch statistics and update `batch_stats` when True (pass
            `mutable=["batch_stats"]` to `apply`).
        Returns:
          (B, num_classes) float32 logits.
        """
        p = self.patch_size
        # Any kernel init does here: `with_whitening` replaces it. The stem computes in float32
        # under bf16: whitening scales each patch direction by 1/sqrt(its variance), which
        # amplifies the input's rounding most in the directions of least variance.
        x = layers.Conv(2 * p * p * x.shape[-1], (p, p), padding="VALID", use_bias=True,
                        kernel_init=layers.torch_kernel_init, bias_init=self.whiten_bias_init, dtype=jnp.float32,
                        param_dtype=self.param_dtype, name="whiten")(x)  # (B, 31, 31, 24)
        x = ops.gelu(x).astype(self.dtype)  # exact (erf) GELU, torch.nn.GELU's default
        group = layers.remat_block(ConvGroup) if self.remat else ConvGroup
        for i, width in enumerate(self.widths):
            x = group(width, self.bn_momentum, self.dtype, self.param_dtype, name=f"block{i + 1}")(x, train)
        x = jnp.max(x, axis=(1, 2))  # global max-pool: (B, C)
        x = nn.Dense(self.num_classes, use_bias=False, kernel_init=self.head_init,
                     dtype=jnp.float32, param_dtype=self.param_dtype, name="fc")(x)
        return x * self.logit_scale


FastNetTiny = partial(FastNet, widths=(8, 16, 16))  # for tests: same structure, a few channels
# airbench94_muon's net: airbench94's, but for the head's init, the logits' scale (a fixed 1/256) and the
# whitening bias, which keeps PyTorch's default init U(±1/sqrt(fan_in)), fan_in = 2 * 2 * 3.
FastNetMuon = partial(FastNet, head_init=unit_std_init, logit_scale=1 / 256,
                      whiten_bias_init=layers.torch_uniform_init(12))
FastNetSmall = partial(FastNet, widths=(32, 64, 64))  # narrower, a fraction of the compute: quick checks
