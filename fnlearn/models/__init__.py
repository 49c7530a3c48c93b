"""The model zoo: Flax Linen modules, one module per family, looked up by name.

    from fnlearn.models import ResNet18
    model = fnlearn.models.get("simple_net")
    init_from_data = fnlearn.models.data_init("fastnet")  # None for most models
"""
from fnlearn.models.basics import ActivatedLinear
from fnlearn.models.basics import CNN
from fnlearn.models.basics import CustomLinear
from fnlearn.models.basics import DynamicNet
from fnlearn.models.basics import Linear
from fnlearn.models.basics import LinearRegression
from fnlearn.models.basics import Net
from fnlearn.models.basics import RecurrentNet
from fnlearn.models.basics import RegressionNet
from fnlearn.models.basics import SimpleNet
from fnlearn.models.basics import VariableDepthMLP
from fnlearn.models.fastnet import FastNet
from fnlearn.models.fastnet import FastNetMuon
from fnlearn.models.fastnet import FastNetSmall
from fnlearn.models.fastnet import FastNetTiny
from fnlearn.models.fastnet import init_fastnet
from fnlearn.models.fastnet import whitening_kernel
from fnlearn.models.fastnet import with_whitening
from fnlearn.models.registry import data_init
from fnlearn.models.registry import get
from fnlearn.models.registry import names
from fnlearn.models.registry import register
from fnlearn.models.resnet import BasicBlock
from fnlearn.models.resnet import Bottleneck
from fnlearn.models.resnet import ResNet
from fnlearn.models.resnet import ResNet18
from fnlearn.models.resnet import ResNet18ImageNet
from fnlearn.models.resnet import ResNet34
from fnlearn.models.resnet import ResNet34ImageNet
from fnlearn.models.resnet import ResNet50
from fnlearn.models.resnet import ResNet50ImageNet
from fnlearn.models.resnet import ResNetTiny
from fnlearn.models.torchvision import WeightsError
from fnlearn.models.torchvision import from_torchvision
from fnlearn.models.torchvision import to_torchvision
from fnlearn.models.yolo import YOLO
from fnlearn.models.yolo import YOLOSmall
from fnlearn.models.yolo import YOLOTiny

register("linear_regression", LinearRegression)
register("regression_net", RegressionNet)
register("net", Net)
register("simple_net", SimpleNet)
register("cnn", CNN)
register("dynamic_net", DynamicNet)
register("variable_depth_mlp", VariableDepthMLP)
register("recurrent_net", RecurrentNet)
register("resnet18", ResNet18, task="image_classifier")
register("resnet34", ResNet34, task="image_classifier")
register("resnet50", ResNet50, task="image_classifier")
register("resnet18_imagenet", ResNet18ImageNet, task="image_classifier")
register("resnet34_imagenet", ResNet34ImageNet, task="image_classifier")
register("resnet50_imagenet", ResNet50ImageNet, task="image_classifier")
register("resnet_tiny", ResNetTiny, task="image_classifier")
register("fastnet", FastNet, task="image_classifier", data_init=with_whitening)
register("fastnet_muon", FastNetMuon, task="image_classifier", data_init=with_whitening)
register("fastnet_small", FastNetSmall, task="image_classifier", data_init=with_whitening)
register("fastnet_tiny", FastNetTiny, task="image_classifier", data_init=with_whitening)
register("yolo_tiny", YOLOTiny, task="detector")
register("yolo_small", YOLOSmall, task="detector")
