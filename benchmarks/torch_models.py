"""PyTorch references for fnlearn's models, for the parity tests and the benchmark.

The nets are written out here, laid out so that `torch_state_dict` (that is,
`fnlearn.models.to_torchvision`) maps Flax variables onto them one to one (`twin` builds one
from fnlearn's variables). Layouts differ: images are NHWC in fnlearn and NCHW in torch, conv
kernels HWIO and OIHW, Dense kernels (in, out) and Linear weights (out, in).

Also here: airbench's on-the-fly augmentation, optimizer groups, lookahead and test-time
augmentation in torch, so the benchmark can run the fast CIFAR recipe (an
epoch, or the whole run) on both sides. They work on the device their tensors are on.
"""
import functools

import torch
from torch import nn
from torch.nn import functional as F

from fnlearn.data.augment import CIFAR10_MEAN, CIFAR10_STD
from fnlearn.models import to_torchvision


def torch_state_dict(variables):
    """`fnlearn.models.to_torchvision(variables)` as tensors, as `load_state_dict` wants them."""
    return {key: torch.from_numpy(a) for key, a in to_torchvision(variables).items()}


class TorchCNN(nn.Module):
    """The seed CNN: conv 3->16 (3x3, no padding) -> ReLU -> flatten (CHW) -> Linear(16*14*14, 10).

    Submodules carry the Flax names (`Conv_0`, `Linear_0`) so `cnn_state_dict` maps onto them.
    """

    def __init__(self):
        super().__init__()
        self.Conv_0 = nn.Conv2d(3, 16, 3)
        self.Linear_0 = nn.Linear(16 * 14 * 14, 10)

    def forward(self, x):  # (B, 3, 16, 16)
        return self.Linear_0(torch.flatten(torch.relu(self.Conv_0(x)), 1))


def cnn_state_dict(variables):
    """fnlearn CNN variables as a `TorchCNN` state_dict.

    Flax flattens the (14, 14, 16) feature map in HWC order and torch in CHW order,
    so the Linear's input columns are reordered.
    """
    state = torch_state_dict(variables)
    weight = state["Linear_0.weight"]  # (10, 14*14*16), HWC-major columns
    state["Linear_0.weight"] = weight.reshape(10, 14, 14, 16).permute(0, 3, 1, 2).reshape(10, -1).contiguous()
    return state


class TorchConvGroup(nn.Module):
    """airbench's ConvGroup: conv, max-pool 2, BN, GELU, conv, BN, GELU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        # airbench: BatchNorm2d(eps=1e-12, momentum=1 - 0.6) with the weight frozen at 1.
        self.bn1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=1 - 0.6)
        self.bn2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=1 - 0.6)
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(False)

    def forward(self, x):
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class TorchFastNet(nn.Module):
    """airbench94's net: frozen 2x2 whitening conv, GELU, ConvGroups, global max-pool, Linear / 9."""

    def __init__(self, widths=(64, 256, 256), num_classes=10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data, never trained
        c_in = 24
        for i, width in enumerate(widths):
            setattr(self, f"block{i + 1}", TorchConvGroup(c_in, width))
            c_in = width
        self.num_blocks = len(widths)
        self.fc = nn.Linear(c_in, num_classes, bias=False)

    def forward(self, x):  # (B, 3, H, W)
        x = F.gelu(self.whiten(x))
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        return self.fc(x.amax(dim=(2, 3))) / 9


def projection(c_in, c_out, stride):
    """torchvision's shortcut: None (identity) where the shape stays, else a 1x1 strided conv + BN."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class TorchBasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BN, identity or 1x1 projection shortcut."""
    expansion = 1

    def __init__(self, c_in, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = projection(c_in, width, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv): 1x1 reduce, 3x3, 1x1 expand by 4."""
    expansion = 4

    def __init__(self, c_in, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = projection(c_in, width * 4, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torchvision's ResNet, with the CIFAR (3x3, no pool) or ImageNet stem, and its parameter names.

    It stands in for torchvision, whose wheel does not import with the CPU torch installed here
    ("operator torchvision::nms does not exist"): with the ImageNet stem and 1000 classes,
    stage sizes (2, 2, 2, 2), (3, 4, 6, 3), and (3, 4, 6, 3) with `TorchBottleneck` are
    torchvision's resnet18, resnet34 and resnet50.
    """

    def __init__(self, stage_sizes=(2, 2, 2, 2), width=64, stem="cifar", num_classes=10, block=TorchBasicBlock):
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        c_in = width
        for i, n in enumerate(stage_sizes):
            c_out = width * 2 ** i * block.expansion
            blocks = [block(c_in if j == 0 else c_out, width * 2 ** i, 2 if i > 0 and j == 0 else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.num_stages = len(stage_sizes)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):  # (B, 3, H, W)
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def fastnet_like(variables):
    """A `TorchFastNet` with the widths and classes of FastNet `variables` (fastnet, _small or _tiny)."""
    params = variables["params"]
    blocks = sorted(name for name in params if name.startswith("block"))
    widths = tuple(params[name]["conv2"]["kernel"].shape[-1] for name in blocks)
    return TorchFastNet(widths, num_classes=params["fc"]["kernel"].shape[-1])


class TorchConvBN(nn.Module):
    """`models.yolo.ConvBN`: conv (no bias), BatchNorm (eps 1e-3, momentum 0.03), SiLU."""

    def __init__(self, c_in, c_out, kernel=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class TorchResidual(nn.Module):
    """`models.yolo.Residual`: 1x1 to half the channels, 3x3 back, plus the input."""

    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = TorchConvBN(c, c // 2, 1), TorchConvBN(c // 2, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class TorchYOLO(nn.Module):
    """`models.YOLO`: the backbone's five stride-2 stages, the top-down pyramid, a head per scale
    (strides 8 and 16); returns the raw maps, (B, 5 + classes, H/s, W/s) each."""

    def __init__(self, widths, depths, neck, num_classes):
        super().__init__()
        self.depths, c = depths, 3
        for i, (width, depth) in enumerate(zip(widths, depths)):
            setattr(self, f"down{i}", TorchConvBN(c, width, 3, 2))
            for j in range(depth):
                setattr(self, f"stage{i}_{j}", TorchResidual(width))
            c = width
        self.lateral5 = TorchConvBN(widths[4], neck, 1)
        self.lateral4, self.merge4 = TorchConvBN(widths[3], neck, 1), TorchConvBN(2 * neck, neck, 3)
        self.lateral3, self.merge3 = TorchConvBN(widths[2], neck, 1), TorchConvBN(2 * neck, neck, 3)
        for level in (0, 1):
            setattr(self, f"head{level}", TorchConvBN(neck, neck, 3))
            setattr(self, f"predict{level}", nn.Conv2d(neck, 5 + num_classes, 1))

    def forward(self, x):  # (B, 3, H, W)
        features = []
        for i, depth in enumerate(self.depths):
            x = getattr(self, f"down{i}")(x)
            for j in range(depth):
                x = getattr(self, f"stage{i}_{j}")(x)
            features.append(x)
        up = functools.partial(F.interpolate, scale_factor=2, mode="nearest")
        p5 = self.lateral5(features[4])
        p4 = self.merge4(torch.cat([up(p5), self.lateral4(features[3])], 1))
        p3 = self.merge3(torch.cat([up(p4), self.lateral3(features[2])], 1))
        return tuple(getattr(self, f"predict{level}")(getattr(self, f"head{level}")(p))
                     for level, p in enumerate((p3, p4)))


def yolo_like(variables):
    """A `TorchYOLO` with the widths, depths and classes of `models.YOLO` `variables`."""
    params = variables["params"]
    widths = tuple(params[f"down{i}"]["conv"]["kernel"].shape[-1] for i in range(5))
    depths = tuple(sum(name.startswith(f"stage{i}_") for name in params) for i in range(5))
    neck = params["lateral5"]["conv"]["kernel"].shape[-1]
    return TorchYOLO(widths, depths, neck, params["predict0"]["kernel"].shape[-1] - 5)


# fnlearn's registry name -> (its PyTorch twin, made from the variables; the map of the variables onto it)
TWINS = {"cnn": (lambda _: TorchCNN(), cnn_state_dict),
         **{name: (fastnet_like, torch_state_dict) for name in ("fastnet", "fastnet_small", "fastnet_tiny")},
         "resnet18": (lambda _: TorchResNet(), torch_state_dict),
         **{name: (yolo_like, torch_state_dict) for name in ("yolo_tiny", "yolo_small")}}


def twin(model, variables):
    """The PyTorch twin of fnlearn's `model` holding `variables`, in channels_last memory format, on the CPU.

    Frozen parameters the variables lack (FastNet's BatchNorm weights) keep torch's init;
    any other key that does not fit is an error, as the two sides must hold the same weights.
    """
    make_net, to_state_dict = TWINS[model]
    net = make_net(variables)
    loaded = net.load_state_dict(to_state_dict(variables), strict=False)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    if loaded.unexpected_keys or set(loaded.missing_keys) - frozen:
        raise KeyError(f"{model}'s PyTorch twin does not fit its variables: missing "
                       f"{sorted(set(loaded.missing_keys) - frozen)}, unexpected {loaded.unexpected_keys}")
    return net.to(memory_format=torch.channels_last)


@functools.cache
def cifar_statistics(device):
    """CIFAR-10's (mean, std), each (1, 3, 1, 1), on `device`: made once, as a host-to-CUDA copy waits
    for the queued work."""
    return torch.tensor((CIFAR10_MEAN, CIFAR10_STD), device=device).view(2, 1, 3, 1, 1).unbind()


def normalize(images):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 `(x / 255 - mean) / std` with CIFAR-10's statistics."""
    mean, std = cifar_statistics(images.device)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def airbench_batch(images, indices, flip_base, epoch, translate=2):
    """airbench's training batch on tensors: gather, normalise, alternating flip, reflect translate.

    Args:
      images: (N, H, W, 3) uint8 training images.
      indices: (B,) int64 positions of the batch in `images`, on their device.
      flip_base: (N,) bool, which images flip on even epochs (fixed for the run).
      epoch: epoch number; odd epochs flip the other images.
      translate: largest shift in pixels.
    Returns:
      (B, 3, H, W) float32 in channels_last memory format, on the images' device.
    """
    device = images.device
    x = normalize(images[indices])  # (B, C, H, W)
    flips = flip_base[indices] ^ bool(epoch % 2)
    x = torch.where(flips[:, None, None, None], x.flip(3), x)
    # Reflect-pad, then crop each image at its own offset with one gather (airbench's batch_crop).
    b, c, h, w = x.shape
    padded = F.pad(x, (translate,) * 4, mode="reflect")
    starts = torch.randint(0, 2 * translate + 1, (b, 2), device=device)
    rows = (starts[:, :1] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (starts[:, 1:] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
    x = padded[torch.arange(b, device=device)[:, None, None, None],
               torch.arange(c, device=device)[None, :, None, None], rows, cols]
    return x.contiguous(memory_format=torch.channels_last)


def airbench_optimizer(net, lr, momentum, weight_decay, bias_lr_scale=64.0):
    """airbench's SGD: Nesterov, BatchNorm biases at `bias_lr_scale` x the learning rate.

    Args:
      net: a `TorchFastNet`; frozen parameters are left out.
      lr, momentum, weight_decay: for the mean loss (torch's coupled weight decay).
      bias_lr_scale: learning-rate factor of the BatchNorm biases (their decay is divided by it).
    """
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    bn_biases = [p for n, p in trainable if ".bn" in n and n.endswith("bias")]
    others = [p for n, p in trainable if not (".bn" in n and n.endswith("bias"))]
    return torch.optim.SGD([{"params": bn_biases, "lr": lr * bias_lr_scale,
                             "weight_decay": weight_decay / bias_lr_scale},
                            {"params": others}],
                           lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def tta_logits(net, x, translate=1):
    """airbench's test-time augmentation, as `fnlearn.data.augment.tta_logits`: the weighted mean of
    the logits of x and its mirror (1/4 each), and of both shifted by `translate` pixels down-right
    and up-left, reflect-padded, each with its mirror (1/8 each); one forward pass on all views.

    Args:
      net: the model in eval mode.
      x: (B, 3, H, W) normalised images.
      translate: shift in pixels; 0 keeps the mirror pair only (1/2 each).
    Returns:
      (B, K) float32.
    """
    views = [x, x.flip(3)]
    weights = [1 / 2, 1 / 2]
    if translate:
        b, c, h, w = x.shape
        padded = F.pad(x, (translate,) * 4, mode="reflect")
        for top in (0, 2 * translate):  # content moved down-right, then up-left
            shifted = padded[:, :, top:top + h, top:top + w]
            views += [shifted, shifted.flip(3)]
        weights = [1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8]
    logits = net(torch.cat(views).contiguous(memory_format=torch.channels_last)).float()
    logits = logits.view(len(views), x.shape[0], -1)
    return sum(w * view_logits for w, view_logits in zip(weights, logits))


def lookahead_(average, net, decay):
    """airbench's lookahead sync: pull `average` toward the weights, then reset the weights to it.

    Args:
      average: float tensors, one per float entry of `net.state_dict()` (params and BN statistics).
      net: the model, changed in place.
      decay: weight kept by the average.
    """
    with torch.no_grad():
        current = [v for v in net.state_dict().values() if v.is_floating_point()]
        torch._foreach_lerp_(average, current, 1 - decay)
        for a, w in zip(average, current):
            w.copy_(a)
